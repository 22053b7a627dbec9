"""What crosses a stage boundary in duplex.torch: a tensor, a tuple of tensors or a dict of them, each with its own
dtype and shape (integer and bool tensors too), packed into one byte buffer whose layout travels in its header — so
the shapes may change from microbatch to microbatch. The executor announces the buffer's length ahead of it
(TensorSpec::kAnnounced).

    buf = pack(*flatten((hidden, positions, mask)))      # uint8 [bytes]
    leaves, structure = unpack(buf)                        # views into buf, no copy
    hidden, positions, mask = rebuild(leaves, structure)

Layout: int64 words [MAGIC, kind, leaves, key bytes, then per leaf: dtype code (-1: none), rank, dims...], the dict's
keys (utf-8, NUL-separated), then each leaf's bytes at an offset aligned to 16."""
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


def pack(leaves, structure):
    """One uint8 tensor (on the leaves' device) holding the structure and every leaf: a single concatenation of the
    header's bytes and the leaves' bytes (reinterpreted, not converted)."""
    kind, keys = structure
    key_bytes = "\0".join(keys).encode() if keys else b""
    words = [MAGIC, kind, len(leaves), len(key_bytes)]
    device = None
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
        device = device or t.device
        words += [_CODE_OF[t.dtype], t.dim()] + list(t.shape)
    device = device or torch.device("cpu")
    head = array.array("q", words).tobytes() + key_bytes
    head += bytes(_round(len(head)) - len(head))
    parts = [torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device)]
    for t in leaves:
        if t is None or t.numel() == 0:
            continue
        raw = t.detach().contiguous().reshape(-1)
        raw = raw.view(torch.uint8)
        parts.append(raw)
        if raw.numel() % _ALIGN:
            parts.append(_pad(_ALIGN - raw.numel() % _ALIGN, device))
    return torch.cat(parts)


def unpack(buf):
    """(leaves, structure) of a packed buffer: views into it (no copy)."""
    if buf.numel() < 32:
        raise ValueError(f"a stage boundary buffer of {buf.numel()} bytes holds no header")
    host = buf if buf.device.type == "cpu" else buf[:min(buf.numel(), 4096)].cpu()
    raw = host.numpy()
    head = array.array("q", raw[:32].tobytes())
    if head[0] != MAGIC:
        raise ValueError("a stage boundary buffer without Duplex's header (the other stage is not a duplex.torch "
                         "stage)")
    _, kind, n, key_len = head
    # Each leaf's header is at least two words; read the most it can be, then walk it.
    words = array.array("q", raw[:min(8 * (4 + n * 10), raw.size) // 8 * 8].tobytes())
    pos, specs = 4, []
    for _ in range(n):
        code, rank = words[pos], words[pos + 1]
        specs.append(None if code < 0 else (_CODES[code], tuple(words[pos + 2:pos + 2 + rank])))
        pos += 2 + max(rank, 0)
    keys = None
    if kind == _DICT:
        keys = raw[8 * pos:8 * pos + key_len].tobytes().decode().split("\0") if n else []
    offset = _round(8 * pos + key_len)
    leaves = []
    for spec in specs:
        if spec is None:
            leaves.append(None)
            continue
        dtype, shape = spec
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if numel == 0:
            leaves.append(torch.empty(shape, dtype=dtype, device=buf.device))
        else:
            leaves.append(buf[offset:offset + nbytes].view(dtype).view(shape))
        offset = _round(offset + nbytes)
    return leaves, (kind, keys)
