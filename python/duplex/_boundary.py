"""What crosses a stage boundary in duplex.torch: a tensor, a tuple of tensors or a dict of them, each with its own
dtype and shape (integer and bool tensors too), packed into one byte buffer whose layout travels in its header — so
the shapes may change from microbatch to microbatch. The executor announces the buffer's length ahead of it
(TensorSpec::kAnnounced).

    buf = pack(*flatten((hidden, positions, mask)))      # uint8 [bytes]
    leaves, structure = unpack(buf)                        # views into buf, no copy
    hidden, positions, mask = rebuild(leaves, structure)

Layout: int64 words [MAGIC, kind, leaves, key bytes, header bytes, then per leaf: dtype code (-1: none), rank,
dims...], the dict's keys (utf-8, NUL-separated), padding to 16, then each leaf's bytes at an offset aligned to 16.
Both ends keep what they built from a header (the same boundary repeats every microbatch)."""
import array

import torch

MAGIC = 0x44555058  # "DUPX"
_ALIGN = 16
_CODES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
_CODE_OF = {d: i for i, d in enumerate(_CODES)}
_TENSOR, _TUPLE, _DICT = 0, 1, 2


def flatten(value):
    """(leaves, structure) of a tensor, a tuple/list of tensors (None allowed) or a dict of str -> tensor."""
    if isinstance(value, torch.Tensor):
        return [value], (_TENSOR, None)
    if isinstance(value, (tuple, list)):
        return list(value), (_TUPLE, None)
    if isinstance(value, dict):
        return list(value.values()), (_DICT, [str(k) for k in value])
    raise TypeError(f"a stage boundary carries a tensor, a tuple of tensors or a dict of them, not "
                    f"{type(value).__name__}")


def rebuild(leaves, structure):
    kind, keys = structure
    if kind == _TENSOR:
        return leaves[0]
    if kind == _TUPLE:
        return tuple(leaves)
    return dict(zip(keys, leaves))


def describe(leaves):
    """"bfloat16[4, 8], int64[4]": what the leaves are, for messages."""
    return ", ".join("none" if t is None else f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in leaves)


def _round(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


_PADS = {}  # zero bytes of each length below _ALIGN, by (length, device)


def _pad(n, device):
    key = (n, device)
    if key not in _PADS:
        _PADS[key] = torch.zeros(n, dtype=torch.uint8, device=device)
    return _PADS[key]


_HEADS = {}  # (kind, keys, dtypes and shapes, device) -> the packed header (the same boundary, step after step)
_LAYOUTS = {}  # header bytes -> (kind, keys, [(dtype, shape, offset, bytes) or None per leaf])


def _header(leaves, kind, keys, device):
    key_bytes = "\0".join(keys).encode() if keys else b""
    words = [MAGIC, kind, len(leaves), len(key_bytes), 0]
    for t in leaves:
        if t is None:
            words += [-1, 0]
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"a stage boundary carries tensors, not {type(t).__name__}")
        if t.dtype not in _CODE_OF:
            raise TypeError(f"a stage boundary cannot carry {t.dtype}")
        if t.dim() > 8:
            raise TypeError(f"a stage boundary carries tensors of at most 8 dimensions, not {t.dim()}")
        words += [_CODE_OF[t.dtype], t.dim()] + list(t.shape)
    words[4] = _round(8 * len(words) + len(key_bytes))
    head = array.array("q", words).tobytes() + key_bytes
    head += bytes(words[4] - len(head))
    return torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device)


def pack(leaves, structure):
    """One uint8 tensor (on the leaves' device) holding the structure and every leaf: a single concatenation of the
    header's bytes and the leaves' bytes (reinterpreted, not converted). The header of a boundary seen before is
    reused."""
    kind, keys = structure
    device = next((t.device for t in leaves if isinstance(t, torch.Tensor)), torch.device("cpu"))
    sig = (kind, tuple(keys) if keys else None, device,
           tuple(None if t is None else (t.dtype, t.shape) if isinstance(t, torch.Tensor) else type(t) for t in leaves))
    head = _HEADS.get(sig)
    if head is None:
        head = _header(leaves, kind, keys, device)
        if len(_HEADS) > 4096:  # shapes that change every step: keep the cache bounded
            _HEADS.clear()
        _HEADS[sig] = head
    parts = [head]
    for t in leaves:
        if t is None or t.numel() == 0:
            continue
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        if raw.numel() % _ALIGN:
            parts.append(_pad(_ALIGN - raw.numel() % _ALIGN, device))
    return torch.cat(parts)


def _layout(raw):
    """(kind, keys, per leaf (dtype, shape, offset, bytes) or None) of a header's bytes."""
    _, kind, n, key_len, _ = array.array("q", raw[:40])
    words = array.array("q", raw[:len(raw) // 8 * 8])
    pos, specs = 5, []
    for _ in range(n):
        code, rank = words[pos], words[pos + 1]
        specs.append(None if code < 0 else (_CODES[code], tuple(words[pos + 2:pos + 2 + rank])))
        pos += 2 + max(rank, 0)
    keys = raw[8 * pos:8 * pos + key_len].decode().split("\0") if kind == _DICT and n else None
    if kind == _DICT and keys is None:
        keys = []
    offset, layout = _round(8 * pos + key_len), []
    for spec in specs:
        if spec is None:
            layout.append(None)
            continue
        dtype, shape = spec
        numel = 1
        for d in shape:
            numel *= d
        layout.append((dtype, shape, offset, numel * dtype.itemsize))
        offset = _round(offset + numel * dtype.itemsize)
    return kind, keys, layout


def unpack(buf):
    """(leaves, structure) of a packed buffer: views into it (no copy)."""
    if buf.numel() < 40:
        raise ValueError(f"a stage boundary buffer of {buf.numel()} bytes holds no header")
    host = buf if buf.device.type == "cpu" else buf[:min(buf.numel(), 4096)].cpu()
    raw = host.numpy()
    magic, _, _, _, head_len = array.array("q", raw[:40].tobytes())
    if magic != MAGIC:
        raise ValueError("a stage boundary buffer without Duplex's header (the other stage is not a duplex.torch "
                         "stage)")
    if not 40 <= head_len <= raw.size:
        raise ValueError(f"a stage boundary header of {head_len} bytes in a buffer of {raw.size}")
    head = raw[:head_len].tobytes()
    found = _LAYOUTS.get(head)
    if found is None:
        found = _layout(head)
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        _LAYOUTS[head] = found
    kind, keys, layout = found
    leaves = []
    for spec in layout:
        if spec is None:
            leaves.append(None)
        elif spec[3] == 0:
            leaves.append(torch.empty(spec[1], dtype=spec[0], device=buf.device))
        else:
            dtype, shape, offset, nbytes = spec
            leaves.append(buf[offset:offset + nbytes].view(dtype).view(shape))
    return leaves, (kind, keys)
