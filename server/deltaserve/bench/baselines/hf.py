"""The naive reference: transformers `generate` on each tenant's merged checkpoint.

What a newcomer writes: keep one model in memory; take the oldest waiting request's
tenant, load that tenant's merged checkpoint with `from_pretrained` if another model is
loaded, run `generate` (greedy) on up to `max_running` of its waiting requests together
(left padding), and return every output whole at the end, so the time to first token
is the end-to-end latency. Greedy only; stop strings are not supported.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deltaserve.bench.baselines.keys import tenant_of_key
from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.config import DTYPES
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import FinishReason, GenerationRequest, RequestOutput
from deltaserve.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError

MAX_DEFAULT_LEN = 4096


@dataclass(frozen=True)
class HfConfig:
    max_running: int = 16
    max_waiting: int = 1024
    dtype: str = "float32"
    tenant_slots: int = 1

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 1:
            raise InvalidArgumentError("max_running and max_waiting must be >= 1")
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}")


class HfEngine:
    """checkpoints: tenant -> merged checkpoint directory ("" = the base)."""

    def __init__(self, checkpoints: Mapping[str, Path], config: HfConfig | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        if "" not in checkpoints:
            raise InvalidArgumentError("hf baseline needs the base checkpoint under tenant ''")
        self.checkpoints = {t: Path(p) for t, p in checkpoints.items()}
        cfg = config or HfConfig()
        self.config = replace(cfg, tenant_slots=max(1, len(self.checkpoints)))
        self.dtype = self.config.dtype
        base = self.checkpoints[""]
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        hf_config = AutoConfig.from_pretrained(base)
        self.max_model_len = min(
            getattr(hf_config, "max_position_embeddings", MAX_DEFAULT_LEN), MAX_DEFAULT_LEN
        )
        eos = hf_config.eos_token_id
        if (base / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(base).eos_token_id or eos
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.registered: dict[str, str] = {}  # engine key -> tenant
        self.resident: str | None = None
        self.model = None
        self.loads = 0
        self.load_seconds = 0.0
        self._pending: list[tuple[str, GenerationRequest, float]] = []  # (tenant, request, arrival)
        self._last = (0, 0)

    @property
    def requests(self) -> dict[str, object]:
        return {r.request_id: r for _, r, _ in self._pending}

    @property
    def slot_capacity(self) -> int:
        return self.config.tenant_slots

    def load_delta(self, key: str, delta: TenantDelta) -> None:
        tenant = tenant_of_key(key)
        if tenant not in self.checkpoints:
            raise NotFoundError(f"hf baseline has no merged checkpoint for tenant {tenant!r}")
        self.registered[key] = tenant

    def unload_delta(self, key: str) -> None:
        self.registered.pop(key, None)

    def delta_bytes(self, tenant: str) -> int:
        return 0

    def add_request(self, req: GenerationRequest) -> None:
        if req.delta_key and req.delta_key not in self.registered:
            raise NotFoundError(f"delta {req.delta_key!r} is not resident")
        tenant = self.registered[req.delta_key] if req.delta_key else ""
        sp = req.sampling
        if sp.temperature != 0 or sp.stop or sp.logprobs or sp.repetition_penalty != 1.0:
            raise InvalidArgumentError(
                "hf baseline supports greedy decoding only (no stop strings, logprobs)"
            )
        if len(req.prompt_token_ids) >= self.max_model_len:
            raise InvalidArgumentError(f"prompt must be shorter than {self.max_model_len} tokens")
        if req.request_id in self.requests:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in use")
        if len(self._pending) >= self.config.max_waiting:
            raise ResourceExhaustedError(f"request queue is full ({self.config.max_waiting} waiting)")
        self._pending.append((tenant, req, time.monotonic()))

    def abort(self, request_id: str) -> RequestOutput | None:
        for i, (_, r, arrival) in enumerate(self._pending):
            if r.request_id == request_id:
                del self._pending[i]
                return RequestOutput(
                    request_id,
                    [],
                    "",
                    True,
                    FinishReason.ABORT,
                    prompt_tokens=len(r.prompt_token_ids),
                    arrival_time=arrival,
                )
        return None

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def _load(self, tenant: str) -> None:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        self.model = None
        gc.collect()
        self.model = AutoModelForCausalLM.from_pretrained(
            self.checkpoints[tenant], dtype=DTYPES[self.config.dtype]
        ).eval()
        self.resident = tenant
        self.loads += 1
        self.load_seconds += time.perf_counter() - t0

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        from transformers import GenerationConfig

        if not self._pending:
            self._last = (0, 0)
            return []
        tenant = self._pending[0][0]
        batch = [p for p in self._pending if p[0] == tenant][: self.config.max_running]
        chosen = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in chosen]
        if tenant != self.resident:
            self._load(tenant)
        started = time.monotonic()
        prompts = [list(r.prompt_token_ids) for _, r, _ in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        stops = [self._stop_ids(r) for _, r, _ in batch]
        shared_stop = sorted(stops[0]) if all(s == stops[0] for s in stops) and stops[0] else None
        gen = GenerationConfig(
            max_new_tokens=max(r.sampling.max_new_tokens for _, r, _ in batch),
            do_sample=False,
            eos_token_id=shared_stop,
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        done = time.monotonic()
        outputs = []
        for row, (_, r, arrival) in enumerate(batch):
            new = out[row, width:].tolist()[: r.sampling.max_new_tokens]
            reason = FinishReason.LENGTH
            for i, tok in enumerate(new):
                if tok in stops[row]:
                    new, reason = new[: i + 1], FinishReason.STOP
                    break
            shown = new[:-1] if reason == FinishReason.STOP else new
            text = self.tokenizer.decode(shown, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            outputs.append(
                RequestOutput(
                    r.request_id,
                    new,
                    text,
                    True,
                    reason,
                    prompt_tokens=len(r.prompt_token_ids),
                    completion_tokens=len(new),
                    arrival_time=arrival,
                    first_scheduled_time=started,
                    first_token_time=done,
                )
            )
        self._last = (sum(len(p) for p in prompts) + sum(o.completion_tokens for o in outputs), len(batch))
        return outputs

    def _stop_ids(self, r: GenerationRequest) -> frozenset[int]:
        eos = frozenset() if r.sampling.ignore_eos else self.eos_ids
        return eos | frozenset(r.sampling.stop_token_ids)

    def stats(self) -> EngineStats:
        waiting = tuple(sorted(t for t, _, _ in self._pending))
        return EngineStats(
            num_running=0,
            num_waiting=len(waiting),
            kv_blocks_used=0,
            kv_blocks_total=0,
            last_step_tokens=self._last[0],
            last_step_seqs=self._last[1],
            last_step_tenants=1 if self._last[1] else 0,
            running_deltas=(),
            waiting_deltas=waiting,
        )
