"""Model shapes: the paper's ladder, a CPU ladder for demos and tests, and inline shapes.

A shape is architecture only (depth, width, heads, MLP width). Vocabulary and context come from the
data and the recipe, so the same shape serves every corpus.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"shape {self.label}: {field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"shape {self.label}: n_head={self.n_head} does not divide d_model={self.d_model}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(f"shape {self.label}: head size {self.d_model // self.n_head} must be even for rotary embeddings")

    @property
    def label(self) -> str:
        return self.name or f"L{self.n_layer}-H{self.n_head}-D{self.d_model}-F{self.d_ff}"

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    def non_embedding_params(self) -> int:
        """N as in the paper: attention q,k,v,o + three SwiGLU matrices + two RMSNorms per block + final norm."""
        d = self.d_model
        return self.n_layer * (4 * d * d + 3 * d * self.d_ff + 2 * d) + d

    def embedding_params(self, vocab_size: int, mask_token: bool) -> int:
        """Input embedding (one extra row for the MDM mask token) plus the untied output head."""
        return (vocab_size + int(mask_token)) * self.d_model + vocab_size * self.d_model

    def as_dict(self) -> dict:
        return {"n_layer": self.n_layer, "n_head": self.n_head, "d_model": self.d_model, "d_ff": self.d_ff}


def _ladder(prefix: str, rows: list[tuple[int, int, int, int]]) -> dict[str, Shape]:
    shapes = {}
    for n_layer, n_head, d_model, d_ff in rows:
        shape = Shape(n_layer, n_head, d_model, d_ff)
        name = f"{prefix}-{_human(shape.non_embedding_params())}"
        shapes[name] = Shape(n_layer, n_head, d_model, d_ff, name=name)
    return shapes


def _human(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n < 2000 else f"{round(n / 1e3)}k"


# The paper's 30 shapes (n_layer, n_head, d_model, intermediate size), named by their size in millions
# as the paper names them; context 2048 and vocab 32000 in the paper's runs.
PAPER_SHAPES = {
    f"smdm-{name}": Shape(*row, name=f"smdm-{name}")
    for name, row in {
        "6M": (6, 4, 256, 1024), "19M": (8, 6, 384, 1536), "34M": (8, 8, 512, 2048),
        "48M": (9, 9, 576, 2304), "66M": (10, 10, 640, 2560), "85M": (13, 10, 640, 2560),
        "75M": (16, 8, 640, 1600), "113M": (12, 12, 768, 3072), "142M": (15, 12, 768, 3072),
        "170M": (18, 12, 768, 3072), "180M": (14, 14, 896, 3584), "206M": (16, 14, 896, 3584),
        "231M": (18, 14, 896, 3584), "268M": (16, 16, 1024, 4096), "302M": (18, 16, 1024, 4096),
        "336M": (20, 16, 1024, 4096), "472M": (18, 10, 1280, 5120), "551M": (21, 10, 1280, 5120),
        "571M": (18, 11, 1408, 5632), "629M": (24, 10, 1280, 5120), "666M": (21, 11, 1408, 5632),
        "717M": (19, 12, 1536, 6144), "761M": (24, 11, 1408, 5632), "831M": (22, 12, 1536, 6144),
        "944M": (25, 12, 1536, 6144), "1028M": (20, 14, 1792, 7168), "1233M": (24, 14, 1792, 7168),
        "1476M": (22, 16, 2048, 8192), "1678M": (25, 16, 2048, 8192), "2121M": (28, 17, 2176, 8704),
    }.items()
}

# Tiny shapes for CPU demos and tests, about 300 to 5M non-embedding parameters, roughly 1.5x apart.
# Width and depth grow together so each step is a sensible model, not a stretched one. The four below 2k
# (one-head where two heads would have an odd size) are for ARMs at 1e9-1e10 FLOPs, whose optimum is that small.
CPU_SHAPES = _ladder("cpu", [
    (1, 1, 4, 16), (1, 1, 6, 24), (1, 2, 8, 32), (1, 1, 10, 40),
    (1, 2, 12, 48), (1, 2, 16, 64), (1, 2, 24, 96), (1, 2, 28, 112), (1, 2, 32, 128), (1, 2, 40, 160), (2, 2, 32, 128), (2, 2, 40, 160), (3, 2, 40, 160), (3, 3, 48, 192),
    (4, 3, 48, 192), (3, 4, 64, 256), (4, 4, 64, 256), (4, 4, 80, 320), (4, 4, 96, 384),
    (6, 4, 96, 384), (5, 4, 128, 512), (6, 4, 160, 640), (8, 6, 192, 768),
])

# The same range with heads at least 16 wide (n_head = d_model // 16, one head below width 32). On the CPU
# ladder above, the MDM's IsoFLOP curves zig-zag by more than their seed noise between its one-head shapes
# and its two-head shapes of size 4-14 (docs/LOG.md, 2026-12-07); the ARM's stay smooth. Widths grow to 28
# in one layer, then width and depth together as above. It starts at width 2: counting the LM head's compute
# (flops_convention spent or palm), an ARM's optimum at 1e10 FLOPs lies below 300 parameters.
CPU16_SHAPES = _ladder("cpu16", [
    (n_layer, max(1, d_model // 16), d_model, 4 * d_model) for n_layer, d_model in [
        (1, 2), (1, 4), (1, 6), (1, 8), (1, 10), (1, 12), (1, 14), (1, 16), (1, 20), (1, 24), (1, 28), (1, 32), (1, 40),
        (2, 32), (2, 40), (3, 40), (3, 48), (4, 48), (3, 64), (4, 64), (4, 80), (4, 96), (6, 96), (5, 128),
        (6, 160), (8, 192)]
])

# The ladders a size rule picks from (sizes.ladder); the paper's shapes continue each above 5M.
LADDERS: dict[str, dict[str, Shape]] = {"cpu": CPU_SHAPES, "cpu16": CPU16_SHAPES}

REGISTRY: dict[str, Shape] = {**PAPER_SHAPES, **CPU_SHAPES, **CPU16_SHAPES}


def resolve_shape(spec: str | dict | Shape) -> Shape:
    """A registry name, an inline mapping {n_layer, n_head, d_model, d_ff?}, or its YAML text."""
    if isinstance(spec, Shape):
        return spec
    if isinstance(spec, str):
        if spec in REGISTRY:
            return REGISTRY[spec]
        import yaml  # only inline shapes given as text need it; the model package loads no YAML otherwise

        parsed = yaml.safe_load(spec) if spec.lstrip().startswith("{") else None
        if not isinstance(parsed, dict):
            raise ConfigError(f"unknown shape {spec!r}{did_you_mean(spec, REGISTRY, n=3)}; see `isoflop models`")
        spec = parsed
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a shape name or mapping, got {spec!r}")
    unknown = set(spec) - {"n_layer", "n_head", "d_model", "d_ff", "name"}
    missing = {"n_layer", "n_head", "d_model"} - set(spec)
    if unknown or missing:
        raise ConfigError(f"inline shape {spec!r} "
                         + (f"has unknown keys {sorted(unknown)}" if unknown else f"lacks {sorted(missing)}"))
    d_model = spec["d_model"]
    return Shape(spec["n_layer"], spec["n_head"], d_model, spec.get("d_ff", 4 * d_model if isinstance(d_model, int) else d_model),
                 name=spec.get("name", ""))


