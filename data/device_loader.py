"""Batches of an in-memory 32x32 split straight from a tensor on the compute device.

The whole split stays as uint8 on the device (FaceScrub: 67,177 x 3 x 32 x 32 = 206 MB);
a batch is an index into it, normalised on the device. No worker processes, no per-sample
Python calls, no host-to-device copy per batch.
"""
import torch


class DeviceBatches:
    """Iterate ``(images float32 (B, 3, 32, 32), labels int64 (B,))`` on ``device``.

    Args:
        split: a ``data.ddh.DDHSplit`` (``images``, ``labels``, ``normalize``).
        batch_size (int > 0).  device (torch.device).
        shuffle (bool): a fresh permutation per iteration, drawn from ``generator`` (CPU).
        drop_last (bool): drop an incomplete last batch.
        indices (LongTensor or None): iterate only these rows (a distributed shard), in order
            unless shuffled.
        with_index (bool): also yield the rows' positions in the split, int64 (B,) on ``device``
            (memory-bank methods store the batch's codes there).
    """

    def __init__(self, split, batch_size, device, shuffle=False, drop_last=False, generator=None,
                 indices=None, with_index=False):
        self.with_index = with_index
        self.split, self.batch_size, self.device = split, int(batch_size), torch.device(device)
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator
        cache = split.__dict__.setdefault("_on_device", {})  # one copy per device, reused by every loader
        if str(self.device) not in cache:
            cache[str(self.device)] = (split.images.to(self.device), split.labels.to(self.device))
        self.images, self.labels = cache[str(self.device)]
        self.indices = indices

    def __len__(self):
        n = len(self.indices) if self.indices is not None else len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.indices) if self.indices is not None else len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.indices is not None:
            order = self.indices[order]
        order = order.to(self.device)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.with_index:
                yield self.split.normalize(self.images[idx]), self.labels[idx], idx
            else:
                yield self.split.normalize(self.images[idx]), self.labels[idx]
