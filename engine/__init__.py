"""The method-agnostic training engine: recipes (optimizer and schedule), the step and the
epoch, checkpoint state and resume, and the evaluation pass used during training.

Nothing here names a method: everything a method brings goes through ``methods.HashingMethod``.
"""
