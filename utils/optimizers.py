"""Several torch optimizers driven as one, for methods that train parts of a network with their own
optimizers (DDAH: one for the face spatial network, one for the hash network).

``OptimizerSet`` offers what the training loop, the learning-rate schedule and the checkpoints use
of a ``torch.optim.Optimizer``: ``param_groups`` (every optimizer's groups, the same dicts, so
setting ``group["lr"]`` reaches them), ``zero_grad``, ``step``, ``state_dict`` and
``load_state_dict``.
"""


class OptimizerSet:
    """Named torch optimizers stepped in order, as one optimizer.

    Args:
        optimizers (dict name -> torch.optim.Optimizer): disjoint parameter sets.
        before_step (callable or None): called with no argument at the start of every ``step()``,
            after the gradients are complete (e.g. to rescale one part's gradients).

    ``state_dict()`` is ``{"optimizers": {name: optimizer.state_dict()}}`` (plain containers and
    tensors, loadable with ``weights_only=True``).

    Raises: ValueError when two optimizers share a parameter, or ``load_state_dict`` receives
    another set's names.
    """

    def __init__(self, optimizers, before_step=None):
        self.optimizers = dict(optimizers)
        self.before_step = before_step
        seen = set()
        for name, opt in self.optimizers.items():
            ids = {id(p) for group in opt.param_groups for p in group["params"]}
            if ids & seen:
                raise ValueError(f"optimizer {name!r} shares parameters with another optimizer of the set")
            seen |= ids

    @property
    def param_groups(self):
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        if self.before_step is not None:
            self.before_step()
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self):
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state):
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(self.optimizers):
            got = sorted(saved) if isinstance(saved, dict) else "a single optimizer's state"
            raise ValueError(f"optimizer state holds {got}, expected the set {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])

    def __repr__(self):
        return f"OptimizerSet({', '.join(f'{k}: {type(v).__name__}' for k, v in self.optimizers.items())})"
