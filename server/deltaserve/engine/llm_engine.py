"""LLMEngine: the synchronous engine API (add_request / step / abort) over one resident base.

Not thread-safe: one thread drives it (AsyncEngine serialises calls onto its loop thread).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import replace
from pathlib import Path

import torch

from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.block_manager import BlockManager
from deltaserve.engine.config import DEFAULT_KV_BYTES, EngineConfig
from deltaserve.engine.detokenizer import IncrementalDetokenizer
from deltaserve.engine.runner import ModelRunner
from deltaserve.engine.sampler import sample_row
from deltaserve.engine.scheduler import Scheduler, SchedulerPolicy
from deltaserve.engine.sequence import Sequence
from deltaserve.engine.slots import DeltaSlots
from deltaserve.engine.stats import EngineStats, StepTimes
from deltaserve.engine.threads import ThreadTuner
from deltaserve.engine.types import FinishReason, GenerationRequest, RequestOutput
from deltaserve.errors import (
    DeltaServeError,
    FailedPreconditionError,
    InvalidArgumentError,
    NonFiniteLogitsError,
    NotFoundError,
    RequestInternalError,
    ResourceExhaustedError,
)
from deltaserve.kernels import fused
from deltaserve.models.checkpoint import load_state_dict, read_config_dict
from deltaserve.models.llama import LlamaFamilyModel
from deltaserve.models.registry import arch_spec, sliding_window

MAX_DEFAULT_LEN = 4096
log = logging.getLogger(__name__)


def _eos_ids(model_dir: Path, hf_config) -> frozenset[int]:
    from transformers import GenerationConfig

    ids = None
    if (model_dir / "generation_config.json").is_file():
        ids = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if ids is None:
        ids = hf_config.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)


def _thread_tuner(config: EngineConfig, device: torch.device) -> ThreadTuner | None:
    """Fixed threads when configured, else (CPU with several threads) the online tuner."""
    if device.type != "cpu":
        return None
    if config.threads:
        torch.set_num_threads(config.threads)
        return None
    most = torch.get_num_threads()
    return ThreadTuner((1, most)) if most > 1 else None


class LLMEngine:
    """One base model resident, tenant deltas in slots, continuous batching over all of them.

    Implements deltaserve.engine.core.EngineCore."""

    def __init__(self, config: EngineConfig, policy: SchedulerPolicy | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.device = torch.device(config.device)
        read_config_dict(config.model)  # typed errors for a missing or non-checkpoint directory
        self.hf_config = AutoConfig.from_pretrained(config.model)
        spec = arch_spec(self.hf_config)
        window = sliding_window(self.hf_config, spec)
        state = load_state_dict(config.model)
        self.model = LlamaFamilyModel(
            self.hf_config, state, config.torch_dtype, self.device, config.base_quant, config.linear_backend,
            lut_table_bits=config.lut_table_bits,
        )
        del state
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_ids(config.model, self.hf_config)
        self.vocab_size = self.hf_config.vocab_size
        max_pos = getattr(self.hf_config, "max_position_embeddings", MAX_DEFAULT_LEN)
        self.max_model_len = config.max_model_len or min(max_pos, MAX_DEFAULT_LEN)
        bs = config.block_size
        per_block = ModelRunner.kv_bytes_per_block(
            self.hf_config, self.model.head_dim, bs, config.torch_dtype
        )
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            wanted = config.max_running * -(-self.max_model_len // bs)
            num_blocks = max(1, min(wanted, (config.kv_cache_bytes or DEFAULT_KV_BYTES) // per_block))
        self.blocks = BlockManager(num_blocks, bs, config.prefix_caching)
        self.slots = DeltaSlots(self.model, config.tenant_slots, config.torch_dtype, self.device)
        self.scheduler = Scheduler(self.blocks, config.max_running, config.max_num_batched_tokens, policy)
        self.runner = ModelRunner(self.model, num_blocks, bs, window, self.device, config.batch_buckets())
        self.requests: dict[str, Sequence] = {}
        self._last = (0, 0, 0)  # tokens, sequences, tenant segments of the last step
        self._preemptions = 0
        self._failed = 0  # requests failed alone for a per-request cause
        self.last_step_times = StepTimes(0.0, 0.0, 0.0, 0.0, 0.0)
        self.threads = _thread_tuner(config, self.device)

    # ---- tenants ----

    def load_delta(self, key: str, delta: TenantDelta) -> None:
        """Make `delta` compute-resident under the delta key `key`. ResourceExhaustedError when
        all slots are taken, FailedPreconditionError when the delta does not fit this base (or
        the key is already resident).

        A key names one delta for the engine's lifetime (the service's keys are tenant@version):
        cached prefix KV computed under a key is reused after the key is unloaded and loaded
        again. Loading other weights under a used key needs `reset_prefix_cache()` first."""
        if not key:
            raise InvalidArgumentError("delta key must be non-empty")
        self.slots.load(key, delta)

    def unload_delta(self, key: str) -> None:
        """Free a delta's slot; FailedPreconditionError while its requests are queued or running."""
        self.slots.slot_of(key)
        busy = [s.request_id for s in self.requests.values() if key in s.request.delta_keys]
        if busy:
            raise FailedPreconditionError(f"delta {key!r} has {len(busy)} unfinished requests")
        self.slots.unload(key)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (running sequences keep the blocks they hold)."""
        self.blocks.reset_cache()

    @property
    def slot_capacity(self) -> int:
        return self.config.tenant_slots

    @property
    def dtype(self) -> str:
        return self.config.dtype  # resolved by EngineConfig ("auto" never survives construction)

    def resident_deltas(self) -> list[str]:
        return sorted(self.slots.entries)

    def delta_bytes(self, key: str) -> int:
        """Bytes the compute-resident delta under `key` occupies."""
        return self.slots.slot_of(key).nbytes

    # ---- requests ----

    def check_request(self, req: GenerationRequest) -> None:
        """Raise the typed error add_request would raise, without changing any state."""
        if req.request_id in self.requests:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in use")
        for key in req.delta_keys:
            if key not in self.slots.entries:
                raise NotFoundError(f"delta {key!r} is not resident")
        n = len(req.prompt_token_ids)
        if n >= self.max_model_len:
            raise InvalidArgumentError(
                f"prompt has {n} tokens; the context holds {self.max_model_len} "
                "(prompt + at least 1 new token)"
            )
        if any(t < 0 or t >= self.vocab_size for t in req.prompt_token_ids):
            raise InvalidArgumentError(f"prompt token ids must be in [0, {self.vocab_size})")
        need = -(-min(n + req.sampling.max_new_tokens, self.max_model_len) // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise InvalidArgumentError(
                f"request needs {need} KV blocks but the cache has {self.blocks.num_blocks}"
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise ResourceExhaustedError(f"request queue is full ({self.config.max_waiting} waiting)")

    def add_request(self, req: GenerationRequest) -> None:
        self.check_request(req)
        sp = req.sampling
        gen = None
        if sp.temperature > 0:
            seed = sp.seed if sp.seed is not None else secrets.randbits(63)
            gen = torch.Generator(device="cpu").manual_seed(seed)
        seq = Sequence(req, IncrementalDetokenizer(self.tokenizer, sp.stop), gen)
        parts = []
        for key, alpha in req.deltas:  # resident (checked above) and pinned while the request lives
            entry = self.slots.slot_of(key)
            parts.append((entry.slot, alpha, entry.planes))
        seq.parts = tuple(parts)
        self.requests[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks; returns its final output (None if unknown)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str) -> RequestOutput:
        lps = None
        if seq.request.sampling.logprobs:
            lps, seq.pending_logprobs = seq.pending_logprobs, []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
            cached_tokens=seq.num_cached_tokens,
            logprobs=lps,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
        )

    def _append(self, seq: Sequence, token: int) -> str:
        """Record a sampled token, set finish_reason when the request ends; returns its new text."""
        sp = seq.request.sampling
        seq.tokens.append(token)
        if token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos):
            seq.finish_reason = FinishReason.STOP  # the stop token's own text is not reported
            return seq.detok.flush()
        text, hit = seq.detok.push(token)
        if hit:
            seq.finish_reason = FinishReason.STOP
            return text
        if seq.num_output >= sp.max_new_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH
            text += seq.detok.flush()
        return text

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns outputs of requests that produced a token this step."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self._preemptions += len(sched.preempted)
        if not sched.scheduled:
            self._last = (0, 0, 0)
            return []
        t1 = time.perf_counter()
        batch, sampled = self.runner.build(sched.scheduled)
        if self.threads is not None:
            self.threads.before_step()
        t2 = time.perf_counter()
        logits = self.runner.forward(batch)
        t3 = time.perf_counter()
        if self.threads is not None:
            decode_only = batch.decode is not None and not batch.prefills
            self.threads.after_step(t3 - t2, batch.num_tokens, decode_only)
        picks, host_logits = self._pick(logits, sampled)
        t4 = time.perf_counter()
        segs = batch.delta_segments
        tokens = sum(n for _, n in sched.scheduled)  # padding rows of a decode bucket not counted
        groups = len(segs) + (sum(segs.lengths_list) < tokens)  # tenant segments + base
        self._last = (tokens, len(sched.scheduled), groups)
        outputs = self._finish_step(sched.scheduled, sampled, picks, host_logits)
        t5 = time.perf_counter()
        self.last_step_times = StepTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        return outputs

    def _pick(
        self, logits: torch.Tensor, sampled: list[Sequence]
    ) -> tuple[list[tuple[int, bool]], dict[int, torch.Tensor]]:
        """Every row's greedy token (first maximal index, as torch.argmax) and whether the row is
        free of NaN / +inf (a -inf logit is a legal "never this token"), computed where the
        logits are (one pass at memory speed; a CPU kernel here) and brought to the host in one
        copy; plus, on the host, the logits rows of requests that need more than the argmax
        (sampling, repetition penalty, logprobs). Plain greedy batches copy no logits at all."""
        argmax, finite = fused.greedy_rows(logits)
        picks = torch.stack((argmax, finite.long()), dim=1).tolist()  # the step's one device sync
        rows = [r for r, seq in enumerate(sampled) if not seq.plain_greedy]
        if not rows:
            return picks, {}
        if logits.device.type == "cpu":
            return picks, {r: logits[r] for r in rows}
        host = logits[torch.tensor(rows, device=logits.device)].cpu()
        return picks, {r: host[i] for i, r in enumerate(rows)}

    def _finish_step(
        self, scheduled: list[tuple[Sequence, int]], sampled: list[Sequence],
        picks: list[tuple[int, bool]], host_logits: dict[int, torch.Tensor],
    ) -> list[RequestOutput]:
        """Advance the scheduled sequences, sample the rows of `sampled`, build the outputs."""
        now = time.monotonic()
        bs, blocks = self.blocks.block_size, self.blocks
        for seq, n in scheduled:
            self.scheduler.policy.on_computed(seq, n)  # fair-share accounting, before num_computed moves
            seq.num_computed += n
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            if seq.num_computed // bs > len(seq.block_keys):  # a block filled up: cache it
                blocks.register(seq.block_table, seq.tokens, seq.num_computed, seq.cache_salt, seq.block_keys)
        outputs = []
        for row, seq in enumerate(sampled):
            argmax, finite = picks[row]
            try:
                if not finite:
                    raise NonFiniteLogitsError(
                        f"the model's logits became non-finite at output token {seq.num_output} "
                        f"(alpha {seq.alpha:g}); this request was stopped, others are unaffected"
                    )
                if seq.plain_greedy:
                    token = argmax
                    text = self._append(seq, token)
                else:
                    token, text = self._sample(seq, host_logits[row], argmax)
            except Exception as exc:  # a per-request cause: fail this request alone
                outputs.append(self._fail(seq, exc))
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            outputs.append(self._output(seq, [token], text))
        return outputs

    def _sample(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> tuple[int, str]:
        """Sample one row's token and record it; returns (token, new text)."""
        sp = seq.request.sampling
        seen = seq.tokens if sp.repetition_penalty != 1.0 else []
        token, lp = sample_row(logits, sp, seen, seq.generator, argmax)
        if lp is not None:
            seq.pending_logprobs.append(lp)
        return token, self._append(seq, token)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End one request with an error (its stream raises it); its KV blocks are scrubbed and freed."""
        if not isinstance(exc, DeltaServeError):
            log.error("request %s failed while sampling", seq.request_id, exc_info=exc)
            exc = RequestInternalError(f"internal error while sampling this request: {type(exc).__name__}")
        # blocks it held alone leave the prefix cache and are zeroed (they may hold non-finite KV)
        self.runner.scrub(self.scheduler.finish(seq, discard=True))
        self.requests.pop(seq.request_id, None)
        self._failed += 1
        seq.finish_reason = FinishReason.ABORT
        out = self._output(seq, [], "")
        out.error = exc
        return out

    def stats(self) -> EngineStats:
        run, wait = self.scheduler.running, self.scheduler.waiting
        return EngineStats(
            num_running=len(run),
            num_waiting=len(wait),
            kv_blocks_used=self.blocks.num_blocks - self.blocks.num_free,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_cached=self.blocks.num_cached_free,
            prefix_cache=replace(self.blocks.counters),
            last_step_tokens=self._last[0],
            last_step_seqs=self._last[1],
            last_step_tenants=self._last[2],
            running_deltas=tuple(sorted(s.request.delta_key or "" for s in run)),
            waiting_deltas=tuple(sorted(s.request.delta_key or "" for s in wait)),
            num_preemptions=self._preemptions,
            num_failed_requests=self._failed,
        )

    # ---- base weights ----

    @torch.inference_mode()
    def swap_base_weights(self, checkpoint_dir: Path) -> None:
        """Copy another checkpoint's weights (same shapes) into the resident base, in place.

        FailedPreconditionError while sequences run (their KV would be stale), with a
        quantized base, or on any missing tensor / shape mismatch (nothing is changed then).
        """
        if self.scheduler.running:
            raise FailedPreconditionError("cannot swap base weights while requests are running")
        if self.config.base_quant != "none":
            raise FailedPreconditionError("swap_base_weights needs an unquantized base")
        state = load_state_dict(Path(checkpoint_dir))
        problem = self.model.replace_base_weights(state)
        if problem:
            raise FailedPreconditionError(f"{checkpoint_dir}: {problem}")
        self.blocks.reset_cache()  # cached KV was computed with the old weights
