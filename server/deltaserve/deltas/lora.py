"""Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), without peft.

What a plain LoRA adds to the weight W [N, K] of a targeted module (PEFT's vanilla variant):

    delta = scaling · B @ A            A = lora_A [r, K], B = lora_B [N, r]
    scaling = alpha / sqrt(r) with use_rslora, else alpha / r

transposed ([K, N] factors, delta = (B @ A)ᵀ) when `fan_in_fan_out` is set. r and alpha of a
module come from `rank_pattern` / `alpha_pattern` (the first key, in file order, that matches
the end of the module name at a dot boundary, as PEFT matches them), else from `r` / `lora_alpha`.

Everything else an adapter can hold changes the model in a way a delta of that form does not
express, and is refused with UnsupportedAdapterError naming the cause: other PEFT methods, LoRA
variants (DoRA, QA-LoRA, aLoRA, ...), initialisations that modify the base (PiSSA, OLoRA, CorDA,
LoftQ, LoRA-GA: convert such adapters to plain LoRA with PEFT first), modules_to_save,
trainable tokens, layer replication, LoRA on embeddings and non-zero LoRA biases. Base
parameters the file holds in full (biases with bias="all" / "lora_only", embedding weights
with save_embedding_layers) are returned for the caller to compare with the base.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltaserve.errors import InvalidArgumentError, UnsupportedAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped transformers model

# config fields that select a LoRA variant whose forward is not W + scaling · B @ A
_VARIANTS = {
    "use_dora": "DoRA rescales every column of W + B·A by a learned magnitude",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens",
    "velora_config": "VeLoRA is a LoRA variant",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "use_bdlora": "block-diagonal LoRA is a LoRA variant",
    "arrow_config": "Arrow routes between several LoRA experts per token",
    "kasa_config": "KaSA is a LoRA variant",
}
# config fields that change the model beyond the targeted linears
_STRUCTURAL = {
    "modules_to_save": "modules_to_save replaces whole modules (e.g. lm_head, embeddings) by trained copies",
    "trainable_token_indices": "trainable tokens change rows of the embedding",
    "layer_replication": "layer replication changes the architecture",
    "target_parameters": "LoRA on parameters (target_parameters) is not LoRA on linear modules",
}
# init_lora_weights values that change the base weights the adapter was trained against
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraSettings:
    """The parts of adapter_config.json that define the delta (validated)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: tuple[str, ...] | str  # names matched at the end of a module name, or one regex
    exclude_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...]
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    bias: str
    base_model_name_or_path: str

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of `module`: its rank_pattern / alpha_pattern entries, else r / lora_alpha."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether target_modules (with exclude_modules, layers_to_transform, layers_pattern)
        selects `module`, a model-relative name such as "model.layers.0.self_attn.q_proj"."""
        if _name_matches(self.exclude_modules, module):
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return module != "lm_head"
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        if not self.layers_to_transform:
            return True
        patterns = self.layers_pattern or ("[^.]*",)
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.)(?:{pattern})\.(\d+)\.", module)
            if m is not None:
                return int(m.group(1)) in self.layers_to_transform
        return False


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors as stored (fp32) with its rank, alpha and scaling."""

    module: str
    lora_a: torch.Tensor  # [r, K] ([r, N] when transposed)
    lora_b: torch.Tensor  # [N, r] ([K, r] when transposed)
    alpha: float
    scaling: float
    transposed: bool  # fan_in_fan_out

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K] of the delta in the orientation of the model's weight."""
        n, k = int(self.lora_b.shape[0]), int(self.lora_a.shape[1])
        return (k, n) if self.transposed else (n, k)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b [N, r], a [r, K]) with delta = b @ a, scaling folded into b (fp32)."""
        if self.transposed:
            return self.lora_a.T * self.scaling, self.lora_b.T
        return self.lora_b * self.scaling, self.lora_a

    def delta(self) -> torch.Tensor:
        """The dense fp32 delta [N, K], computed in PEFT's order: (B @ A)[ᵀ] · scaling."""
        d = self.lora_b @ self.lora_a
        return (d.T if self.transposed else d) * self.scaling


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed adapter: settings, factors per module, and the base parameters it holds in full."""

    path: Path
    settings: LoraSettings
    modules: dict[str, LoraFactors]
    # param name -> tensor: biases (bias="all" / "lora_only") and base weights (save_embedding_layers)
    saved: dict[str, torch.Tensor]


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _name_matches(names: tuple[str, ...] | str, module: str) -> bool:
    if isinstance(names, str):
        return bool(names) and re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{n}") for n in names)


def _strings(value: object, field: str) -> tuple[str, ...] | str:
    """A config field that PEFT accepts as a regex string or a list of names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidArgumentError(f"{CONFIG_FILE}: {field} must be a string or a list of strings, got {value!r}")


def _number(value: object, field: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidArgumentError(f"{CONFIG_FILE}: {field} must be {kind}, got {value!r}")
    return value


def _pattern(value: object, field: str, integer: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{CONFIG_FILE}: {field} must be an object, got {value!r}")
    return {str(k): _number(v, f"{field}[{k!r}]", integer) for k, v in value.items()}


def _refuse_unsupported(cfg: dict) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"only LoRA adapters (peft_type LORA) can be imported; this one is {peft_type!r}"
        )
    for field, why in _VARIANTS.items():
        if cfg.get(field):
            raise UnsupportedAdapterError(
                f"{field} is set: {why}, which is not an additive delta the engine serves exactly; "
                "merge the adapter into the model (PEFT merge_and_unload) and use `deltaserve compress`"
            )
    for field, why in _STRUCTURAL.items():
        if cfg.get(field):
            raise UnsupportedAdapterError(
                f"{field} is set: {why}; import-lora imports LoRA on the decoder-block linears only "
                "(merge the adapter and use `deltaserve compress`, which stores such changes dense)"
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and (init.startswith(_BASE_MODIFYING_INITS) or init == "mica"):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r}: the adapter belongs to a base modified at initialisation "
            "(or a LoRA variant); convert it to a plain LoRA with PEFT "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) before importing"
        )
    if cfg.get("lora_ga_config"):
        raise UnsupportedAdapterError(
            "lora_ga_config is set: LoRA-GA modifies the base at initialisation; convert the adapter "
            "to a plain LoRA with PEFT before importing"
        )


def parse_settings(cfg: dict) -> LoraSettings:
    """Validated LoraSettings of an adapter_config.json object (UnsupportedAdapterError for what
    cannot be imported, InvalidArgumentError for malformed fields)."""
    _refuse_unsupported(cfg)
    target = _strings(cfg.get("target_modules"), "target_modules")
    if not target:
        raise InvalidArgumentError(f"{CONFIG_FILE}: target_modules is empty")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise InvalidArgumentError(f"{CONFIG_FILE}: layers_to_transform must be an int or a list of ints")
    pattern = _strings(cfg.get("layers_pattern"), "layers_pattern")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise InvalidArgumentError(f"{CONFIG_FILE}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    return LoraSettings(
        r=int(_number(cfg.get("r", 8), "r", integer=True)),
        lora_alpha=float(_number(cfg.get("lora_alpha", 8), "lora_alpha")),
        use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        target_modules=target,
        exclude_modules=_strings(cfg.get("exclude_modules"), "exclude_modules"),
        layers_to_transform=tuple(layers or ()),
        layers_pattern=(pattern,) if isinstance(pattern, str) else pattern,
        rank_pattern=_pattern(cfg.get("rank_pattern"), "rank_pattern", integer=True),
        alpha_pattern=_pattern(cfg.get("alpha_pattern"), "alpha_pattern", integer=False),
        bias=bias,
        base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
    )


def _read_config(adapter: Path) -> dict:
    path = adapter / CONFIG_FILE
    if not adapter.is_dir():
        raise InvalidArgumentError(f"--adapter {adapter} is not a directory")
    if not path.is_file():
        raise InvalidArgumentError(f"{adapter} has no {CONFIG_FILE}; is it a PEFT adapter directory?")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InvalidArgumentError(f"{path} is not a JSON object")
    return cfg


def _read_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    path = adapter / WEIGHTS_FILE
    if not path.is_file():
        hint = ""
        if (adapter / "adapter_model.bin").exists():
            hint = " (adapter_model.bin pickles are not read; re-save the adapter with safe_serialization)"
        raise InvalidArgumentError(f"{adapter} has no {WEIGHTS_FILE}{hint}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on corrupt data
        raise InvalidArgumentError(f"cannot read {path}: {exc}") from exc
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise InvalidArgumentError(f"{path}: tensor {key} is not floating point ({t.dtype})")
        if not torch.isfinite(t).all():
            raise InvalidArgumentError(f"{path}: tensor {key} holds NaN/Inf values")
    return tensors


def _classify(key: str) -> tuple[str, str]:
    """(kind, module or param name) of a stored tensor name, after the PEFT prefix."""
    name = key.removeprefix(KEY_PREFIX)
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "lora_bias")):
        if name.endswith(suffix):
            return kind, name.removesuffix(suffix)
    if ".lora_magnitude_vector" in name:
        return "dora", name.split(".lora_magnitude_vector")[0]
    if ".lora_embedding_" in name:
        return "embedding", name.split(".lora_embedding_")[0]
    if ".base_layer." in name:  # a full base weight (save_embedding_layers): "<module>.<param>"
        return "base_layer", name.replace(".base_layer.", ".")
    if name.endswith(".bias"):
        return "bias", name
    return "unknown", name


def _refuse_tensor(kind: str, name: str, key: str) -> None:
    if kind == "dora":
        raise UnsupportedAdapterError(
            f"{name} holds a DoRA magnitude vector ({key}); DoRA is not an additive delta the engine "
            "serves exactly: merge the adapter and use `deltaserve compress`"
        )
    if kind == "embedding":
        raise UnsupportedAdapterError(
            f"{name} is a LoRA on an embedding ({key}); only the decoder-block linears "
            "(q/k/v/o/gate/up/down projections) can be imported"
        )
    raise UnsupportedAdapterError(
        f"unknown tensor {key} in {WEIGHTS_FILE}: not a lora_A / lora_B weight of a plain LoRA"
    )


def read_lora_adapter(adapter: Path) -> LoraAdapter:
    """Parse the adapter directory: settings, every module's factors, saved base parameters.

    Checks that each module has both factors with matching ranks, that the rank is the one its
    config (r / rank_pattern) gives, and that target_modules selects it. Refusals raise
    UnsupportedAdapterError, malformed files InvalidArgumentError. Names are model-relative
    ("model.layers.0.self_attn.q_proj"); matching them to the base is the caller's job.
    """
    adapter = Path(adapter)
    settings = parse_settings(_read_config(adapter))
    tensors = _read_tensors(adapter)
    if not tensors:
        raise InvalidArgumentError(f"{adapter / WEIGHTS_FILE} holds no tensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        kind, name = _classify(key)
        t = tensors[key]
        if kind in ("A", "B"):
            if t.dim() != 2:
                raise InvalidArgumentError(f"{key} is {list(t.shape)}, expected a matrix")
            pairs.setdefault(name, {})[kind] = t.to(torch.float32)
        elif kind == "lora_bias":
            if bool(t.ne(0).any()):
                raise UnsupportedAdapterError(
                    f"{name} has a trained LoRA bias ({key}, lora_bias=true); "
                    "only bias-free LoRA can be imported"
                )
        elif kind in ("bias", "base_layer"):
            saved[name] = t
        else:
            _refuse_tensor(kind, name, key)
    modules: dict[str, LoraFactors] = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidArgumentError(f"{name} has no {missing} weight in {WEIGHTS_FILE}")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise InvalidArgumentError(
                f"{name}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}; their ranks differ"
            )
        r, alpha = settings.rank_alpha(name)
        if a.shape[0] != r:
            raise InvalidArgumentError(
                f"{name} has rank {a.shape[0]} but {CONFIG_FILE} gives it r={r} (r / rank_pattern)"
            )
        if not settings.targets(name):
            raise UnsupportedAdapterError(
                f"{WEIGHTS_FILE} holds LoRA weights for {name}, which target_modules "
                f"{_show(settings.target_modules)} does not select"
            )
        modules[name] = LoraFactors(name, a, b, alpha, settings.scaling(name), settings.fan_in_fan_out)
    return LoraAdapter(adapter, settings, modules, saved)


def _show(target: tuple[str, ...] | str) -> str:
    return repr(target) if isinstance(target, str) else json.dumps(list(target))
