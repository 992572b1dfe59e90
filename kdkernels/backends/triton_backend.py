"""Triton backend: fused KD loss + gradient in one kernel family, tempered (log-)softmax.

Runs on CUDA devices, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1,
which must be set before Triton is imported; the kernels package is imported lazily).

Launch plan (docs/triton.md has the cost model):

* N rows >= what fills the device, or V small: one program per row (PHASE 0).
  V <= ONE_BLOCK_MAX keeps the row in registers: one read, 2 exps per element (kl).
  Otherwise two streaming passes over the row (statistics, then loss + gradient),
  three when the gradient needs the row's divergence first (NEED_D). Rows whose two
  tensors fit L2_ROW_BYTES run on a persistent grid of L2_BUDGET / row bytes programs
  (schedule "l2", the default), so that the second pass re-reads the row from L2;
  schedule "rows" keeps one program per row (selectable through the tuning table's
  "schedule" key; the GPU run's tune stage times BLOCK and num_warps, not yet the schedule).
* Few rows and a large vocabulary: the vocabulary is split across programs. Pass 1
  writes per-(row, split) statistics to an [N, splits, 8] float32 buffer;
  every pass-2 program combines its row's statistics itself (no separate combine
  launch, no atomics), writes its gradient span and a loss partial; the partials
  ([N, splits]) are summed in a fixed order. Deterministic.

Extra memory: the gradients plus O(N * splits) float32 -- no (N, V) float32 buffer.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from . import DIVERGENCES, tuned
from . import torch_math as M
from .triton_series import SERIES_U0, series  # noqa: F401 - SERIES_U0 is the kernels' U0

NAME = "triton"

# The block rule, written once (docs/triton.md says why these numbers).
ONE_BLOCK_MAX = 8192      # a row up to this many columns stays in registers
LOOP_BLOCK = 4096         # columns per step of a streaming pass
MIN_SPLIT_BLOCKS = 4      # a vocab split streams at least this many blocks
PROGRAMS_PER_SM = 4       # programs wanted in flight per SM before splitting rows
_INTERPRETER_SMS = 4      # "SMs" assumed by the CPU interpreter (only shapes the split rule)
L2_BUDGET = 40_000_000    # bytes of rows in flight whose second pass re-reads from L2 (H200: 60 MB L2)
L2_ROW_BYTES = 131072     # rows read up to this many bytes per pass take the "l2" schedule
SCHEDULES = ("l2", "rows")

# Test hook: overrides for the constants above (lower-case names) and `poison=True` to
# fill every output with NaN before the kernel writes it. Use `tuning(...)`.
_TUNING: dict = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Temporarily override the block rule (one_block_max, loop_block, num_warps, rows_per_block,
    min_split_blocks, programs_per_sm, sms, schedule, l2_budget, l2_row_bytes), the device name
    the tuning table is looked up by (device_name), ignore the table (no_table=True), or set
    poison=True; for tests, benchmarks and the kernel report."""
    old = dict(_TUNING)
    _TUNING.update(overrides)
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(old)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def available(device: torch.device) -> str | None:
    """None if this backend runs on `device`, else the reason it cannot (never raises)."""
    device = torch.device(device)
    if device.type == "cpu":
        if not _interpreting():
            return "Triton runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1 set before Triton is imported)"
    elif device.type != "cuda":
        return f"Triton runs on CUDA devices, not {device.type}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return None


def _kernels():
    from . import triton_kernels
    return triton_kernels


@dataclass(frozen=True)
class LaunchConfig:
    block: int          # columns per step (power of 2)
    splits: int         # vocab splits per row (1: one program per row)
    span: int           # columns per split (multiple of block; V when splits == 1)
    one_block: bool     # whole row in registers
    num_warps: int
    rows: int = 1       # R: a streaming block is [R, block / R], per-lane statistics over R
    schedule: str = "l2"  # "l2": rows that fit L2_ROW_BYTES run on a persistent grid; "rows": one program each


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully described: the kernel, its grid, positional arguments and
    keyword arguments (constexprs and num_warps). The launchers below build these and call
    them; `python -m kdkernels report` builds the same records on meta tensors and compiles
    exactly these specialisations for sm_90, so the report follows the launcher by construction."""
    kernel: object      # a @triton.jit function of triton_kernels
    grid: tuple
    args: tuple
    meta: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if "sms" in _TUNING:
        return _TUNING["sms"]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _device_name(device: torch.device) -> str | None:
    if "device_name" in _TUNING:
        return _TUNING["device_name"]
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


def tuned_entry(N: int, V: int, device: torch.device) -> dict | None:
    """The tuning table's entry (backends/tuned.py) for this device, V and N (None: the block
    rule decides). The table holds what a GPU run measured fastest in the streaming regime."""
    if _TUNING.get("no_table"):
        return None
    return tuned.lookup(NAME, _device_name(device), N, V)


def _rows_per_block(block: int, warps: int) -> int:
    """R of a streaming block: each thread holds one 16-byte pack (8 2-byte elements) per block
    row, so the lane statistics reduce over R inside a thread."""
    if "rows_per_block" in _TUNING:
        return _TUNING["rows_per_block"]
    return max(1, block // (warps * 32 * 8))


def launch_config(N: int, V: int, device: torch.device) -> LaunchConfig:
    """The block rule: one place decides block size, vocab splits, warps and the schedule (a
    tuning-table entry, when there is one, replaces the streaming block, warps and schedule)."""
    one_max = _TUNING.get("one_block_max", ONE_BLOCK_MAX)
    if V <= one_max:
        block = max(16, _next_pow2(V))
        return LaunchConfig(block, 1, V, True, min(16, max(1, block // 512)))
    entry = tuned_entry(N, V, device) if not _TUNING.get("loop_block") else None
    block = entry["block"] if entry else _TUNING.get("loop_block", LOOP_BLOCK)
    warps = entry["num_warps"] if entry else _TUNING.get("num_warps", min(16, max(4, block // 512)))
    schedule = _TUNING.get("schedule", (entry or {}).get("schedule", "l2"))
    min_blocks = _TUNING.get("min_split_blocks", MIN_SPLIT_BLOCKS)
    want = _TUNING.get("programs_per_sm", PROGRAMS_PER_SM) * _sm_count(device)
    splits = 1
    if N < want:
        splits = max(1, min(-(-want // N), V // (block * min_blocks)))
    if splits > 1:
        span = -(-(-(-V // splits)) // block) * block  # ceil(V / splits) rounded up to a block
        splits = -(-V // span)
    span = span if splits > 1 else V
    return LaunchConfig(block, splits, span, False, warps, _rows_per_block(block, warps), schedule)


def rows_in_flight(cfg: LaunchConfig, N: int, row_bytes: int) -> int:
    """Programs of a one-program-per-row launch: N, or under the "l2" schedule (rows reading at
    most L2_ROW_BYTES per pass) L2_BUDGET / row_bytes programs that loop over the rows, so a
    row's later passes re-read it from L2."""
    if cfg.one_block or cfg.splits > 1 or cfg.schedule != "l2":
        return N
    if row_bytes > _TUNING.get("l2_row_bytes", L2_ROW_BYTES):
        return N
    return max(1, min(N, _TUNING.get("l2_budget", L2_BUDGET) // max(1, row_bytes)))


def _empty(shape, dtype, device) -> torch.Tensor:
    if _TUNING.get("poison"):
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kd_forward(student, teacher, labels, *, teacher_is_probs, temperature, divergence, beta,
               soft_scale, hard_weight, ignore_index, teacher_grad):
    """Fused per-row loss and gradients (the contract of kdkernels.ops.kd_fused)."""
    grad_s = _empty(student.shape, student.dtype, student.device)
    loss, grad_t = kd_forward_into(
        student, teacher, labels, grad_s, teacher_is_probs=teacher_is_probs,
        temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
        hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad)
    return loss, grad_s, grad_t


# Teacher ensembles: up to this many teachers (with non-zero weight) are mixed on the fly inside
# the fused kernel; larger ensembles go through chunked.ensemble_forward (a (rows, V) mixture per chunk).
MAX_ENSEMBLE = 4


def kd_ensemble_forward(student, teachers, weights, labels, *, temperature, divergence, beta,
                        soft_scale, hard_weight, ignore_index):
    """(loss [N] float32, grad_s [N, V]) against p = sum_k w_k softmax(t_k / T) (the contract of
    kdkernels.ops.kd_ensemble_fused). A pre-pass writes each row's per-teacher statistics
    ([N, K, 2] float32); the fused kernel then forms log p block by block from the teachers'
    logits, so no (N, V) mixture exists. Teachers with weight 0 are never read."""
    live = [(t, w) for t, w in zip(teachers, weights) if w > 0]
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
              hard_weight=hard_weight, ignore_index=ignore_index)
    if len(live) > _TUNING.get("max_ensemble", MAX_ENSEMBLE):
        from .chunked import ensemble_forward
        return ensemble_forward(NAME, student, [t for t, _ in live], [w for _, w in live], labels, **kw)
    grad_s = _empty(student.shape, student.dtype, student.device)
    loss, _ = kd_forward_into(student, live[0][0], labels, grad_s, teacher_is_probs=False,
                              teacher_grad=False, ensemble=live, **kw)
    return loss, grad_s


LOG2E = 1.4426950408889634


def _mixture_stats(teachers, weights, temperature):
    """(Launch, mix): mix [N, K, 2] float32 gets each teacher's (MC, log2 w_k - log2 d_k) per row."""
    t0 = teachers[0]
    N, V = t0.shape
    pad = teachers + [t0] * (4 - len(teachers))
    lw = [math.log2(w) for w in weights] + [0.0] * (4 - len(weights))
    mix = _empty((N, len(teachers), 2), torch.float32, t0.device)
    cfg = launch_config(N, V, t0.device)
    block = cfg.block if cfg.one_block else _TUNING.get("loop_block", LOOP_BLOCK)
    launch = Launch(_kernels()._mixture_stats_kernel, (N,),
                    (*pad, mix, V, *(t.stride(0) for t in pad), LOG2E / temperature, *lw),
                    dict(NT=len(teachers), BLOCK=block, R=_rows_per_block(block, cfg.num_warps),
                         STATIC_V=V if _interpreting() else 0, num_warps=cfg.num_warps))
    return launch, mix


def kd_forward_into(student, teacher, labels, grad_s, *, teacher_is_probs, temperature, divergence,
                    beta, soft_scale, hard_weight, ignore_index, teacher_grad, ensemble=None):
    """kd_forward writing d loss_row / d student into `grad_s` ([N, V], student.dtype, last-dim
    stride 1). `grad_s` may be `student` itself (in-place mode: the logits are consumed; every
    element is read before its gradient overwrites it). Returns (loss [N] float32, grad_t).
    `ensemble`: [(teacher logits, weight > 0)] of 1..MAX_ENSEMBLE teachers (weights summing to 1),
    mixed in the kernel; `teacher` is then its first teacher."""
    N = student.shape[0]
    grad_t = _empty(teacher.shape if teacher_grad else (0,), teacher.dtype, student.device)
    if N == 0:
        return torch.zeros(0, dtype=torch.float32, device=student.device), grad_t
    launches, loss = kd_launches(
        student, teacher, labels, grad_s, grad_t, teacher_is_probs=teacher_is_probs,
        temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
        hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad, ensemble=ensemble)
    for launch in launches:
        launch()
    return (loss.view(N) if loss.shape[1] == 1 else loss.sum(1)), grad_t


def kd_launches(student, teacher, labels, grad_s, grad_t, *, teacher_is_probs, temperature, divergence,
                beta, soft_scale, hard_weight, ignore_index, teacher_grad, ensemble=None):
    """([Launch] in order, loss partials [N, splits] float32) of kd_forward_into for N >= 1 rows:
    the ensemble's pre-pass if any, then phase 0, or phases 1, (2,) 3 of a split vocabulary."""
    N, V = student.shape
    cfg = launch_config(N, V, student.device)
    make, loss, _, _, need_d, pre = _launcher(
        student, teacher, labels, grad_s, grad_t, cfg, teacher_is_probs=teacher_is_probs,
        temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
        hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad, ensemble=ensemble)
    phases = (0,) if cfg.splits == 1 else (1, 2, 3) if need_d else (1, 3)
    return pre + [make(phase) for phase in phases], loss


def kd_forward_shard(student, teacher, labels, *, vocab_start, all_reduce, reports_d, teacher_is_probs,
                     temperature, divergence, beta, soft_scale, hard_weight, ignore_index, teacher_grad):
    """kd_forward on one vocabulary shard of every row (vocab-parallel KD, kdkernels.distributed):
    this rank holds columns [vocab_start, vocab_start + V_local) of both logits; labels are
    global ids. The shard is one "split" of each row: phase 1 writes its (max, sum) statistics,
    `all_reduce(tensor, "max" | "sum")` (in place, O(N) values) makes them global, phase 2 (if
    the gradient needs the row's divergence first) writes partial D sums, summed the same way,
    and phase 3 writes this shard's gradients and loss partials, summed once more (the
    divergence of a NEED_D row is counted by the rank with `reports_d`, the hard-label term by
    the rank holding the label). No host synchronisation. Returns (loss [N] float32, the same
    on every rank, grad_s, grad_t, v_end): v_end is a 0-d float64 tensor, the vocabulary size."""
    N, V = student.shape
    dev = student.device
    grad_s = _empty(student.shape, student.dtype, dev)
    grad_t = _empty(teacher.shape if teacher_grad else (0,), teacher.dtype, dev)
    block = min(_TUNING.get("loop_block", LOOP_BLOCK), max(16, _next_pow2(V)))
    warps = min(16, max(4, block // 512))
    cfg = LaunchConfig(block, 1, V, False, warps, _rows_per_block(block, warps))
    # Labels are checked against the global vocabulary by torch ops (no sync): a label no shard
    # holds becomes a negative id, which the kernel turns into a NaN row like any bad label.
    make, loss, stats, dsum, need_d, _ = _launcher(
        student, teacher, labels, grad_s, grad_t, cfg, teacher_is_probs=teacher_is_probs,
        temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
        hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad,
        y_start=vocab_start, v_total=2 ** 62, d_split=0 if reports_d else -1)
    if N == 0:  # every rank has the same rows: none of them calls a collective
        return loss.view(N), grad_s, grad_t, torch.tensor(float(vocab_start + V), dtype=torch.float64)
    make(1)()
    # stats [N, 1, 8] = (MC, d) of s', t', s (MC: base-2 scaled maxima, at least float32's lowest)
    # and the raw maxima of s, t: the global maxima (and the vocabulary's end) ...
    m, d = stats[:, 0, [0, 2, 4, 6, 7]], stats[:, 0, [1, 3, 5]]
    m_all = torch.cat([m.reshape(-1).double(), torch.full((1,), vocab_start + V, dtype=torch.float64,
                                                          device=dev)])
    all_reduce(m_all, "max")
    v_end = m_all[-1]
    m_all = m_all[:-1].view(N, 5).float()
    # ... then the sums rescaled to them
    d_all = d * torch.exp2(m[:, :3] - m_all[:, :3])
    all_reduce(d_all, "sum")
    stats[:, 0, [0, 2, 4, 6, 7]] = m_all
    stats[:, 0, [1, 3, 5]] = d_all
    if labels is not None:
        bad = (labels >= v_end) & (labels != ignore_index)
        labels = torch.where(bad, -1 if ignore_index != -1 else -2, labels)
    if need_d:
        make(2, labels)()
        all_reduce(dsum, "sum")
    make(3, labels)()
    all_reduce(loss, "sum")
    return loss.view(N), grad_s, grad_t, v_end


def _need_d(name: str, teacher_grad: bool, phased: bool) -> bool:
    """Whether a D pass runs before the gradient pass: the gradient needs the row's divergence or
    sums before any element is written (kl and soft_ce: with a teacher gradient only), or
    soft_ce's exact log-sum must be summed over the vocabulary splits before its loss."""
    if name == "kl":
        return teacher_grad
    if name == "soft_ce":
        return teacher_grad or phased
    return True


def _aligned(tensors) -> bool:
    """Whether every row of every tensor starts at the same column residue mod 8 on a 16-byte
    aligned base: then one head of < 8 columns aligns all of them (the kernels' ALIGN)."""
    ts = [t for t in tensors if t.numel()]
    if not ts:
        return False
    r = ts[0].stride(0) % 8
    return all(t.stride(0) % 8 == r and t.data_ptr() % 16 == 0 for t in ts)


def _launcher(student, teacher, labels, grad_s, grad_t, cfg, *, teacher_is_probs, temperature, divergence,
              beta, soft_scale, hard_weight, ignore_index, teacher_grad, ensemble=None, y_start=0,
              v_total=None, d_split=0):
    """(make(phase) -> Launch, loss, stats, dsum, need_d, pre): _kd_kernel's arguments, built once;
    `pre` holds the launches that must run first (an ensemble's statistics)."""
    N, V = student.shape
    dev = student.device
    tx, nt, mix, pre = [teacher] * 3, 1, None, []
    if ensemble is not None and len(ensemble) > 1:
        nt = len(ensemble)
        tx = [t for t, _ in ensemble[1:]] + [teacher] * (4 - nt)
        mix_launch, mix = _mixture_stats([t for t, _ in ensemble], [w for _, w in ensemble], temperature)
        pre = [mix_launch]
    name = DIVERGENCES[divergence]
    phased = cfg.splits > 1 or v_total is not None  # stats travel through memory between launches
    need_d = _need_d(name, teacher_grad, phased)
    has_hard = labels is not None and hard_weight != 0
    f32 = dict(dtype=torch.float32, device=dev)
    loss = _empty((N, cfg.splits), torch.float32, dev)
    stats = _empty((N, cfg.splits, 8), **f32) if phased else loss
    dsum = _empty((N, cfg.splits, 5), **f32) if phased and need_d else loss
    gt = grad_t if teacher_grad else grad_s  # never written when teacher_grad is False
    inv_t = 1.0 / temperature
    cs = LOG2E * inv_t
    ct = 1.0 if nt > 1 else inv_t if teacher_is_probs else cs
    deg, k = series(divergence, beta)
    row_bytes = V * (student.element_size() + sum(t.element_size() for t in [teacher] + tx[:nt - 1]))
    progs = rows_in_flight(cfg, N, row_bytes) if v_total is None else N
    rows_per_prog = -(-N // progs)
    persistent = rows_per_prog > 1
    align = not cfg.one_block and _aligned([student, teacher, grad_s] + ([grad_t] if teacher_grad else [])
                                           + tx[:nt - 1])
    args = (student, teacher, labels if labels is not None else loss, loss, grad_s, gt, stats, dsum,
            *tx, mix if mix is not None else loss,
            N, V, student.stride(0), teacher.stride(0), grad_s.stride(0), gt.stride(0),
            *(t.stride(0) for t in tx), cfg.splits, cfg.span, progs, rows_per_prog,
            cs, ct, LOG2E, beta, *k, soft_scale, soft_scale * inv_t, hard_weight, ignore_index,
            y_start, V if v_total is None else v_total, d_split)
    flags = dict(BLOCK=cfg.block, R=1 if cfg.one_block else cfg.rows, ONE_BLOCK=cfg.one_block,
                 SPLITS_P2=_next_pow2(cfg.splits), DIV=divergence, DEG=deg, TEACHER_PROBS=teacher_is_probs,
                 HAS_LABELS=labels is not None, HAS_HARD=has_hard, HARD_SEP=has_hard and temperature != 1.0,
                 TEACHER_GRAD=teacher_grad, NEED_D=need_d, LOSS_IN_GRAD=not need_d or name == "tvd",
                 EXACT_S=name in ("soft_ce", "tvd"), EXACT_T=name == "tvd", ALIGN=align, PERSISTENT=persistent,
                 NT=nt, num_warps=cfg.num_warps, STATIC_SPAN=cfg.span if _interpreting() else 0,
                 STATIC_ROWS=rows_per_prog if _interpreting() and persistent else 0)
    kernel = _kernels()._kd_kernel

    def make(phase, labels=None):  # labels: the same rows' labels, rewritten (kd_forward_shard)
        a = args if labels is None else args[:2] + (labels,) + args[3:]
        return Launch(kernel, (progs if phase == 0 else N, cfg.splits), a, dict(flags, PHASE=phase))

    return make, loss, stats, dsum, need_d, pre


def softmax_forward(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) or log_softmax(x / T) over the last dim of a 2-D tensor, in x.dtype."""
    N, V = x.shape
    out = _empty(x.shape, x.dtype, x.device)
    if N == 0 or V == 0:
        return out
    softmax_forward_launch(x, out, temperature, log)()
    return out


def softmax_forward_launch(x, out, temperature, log) -> Launch:
    """softmax_forward's one launch (one program per row) for x [N, V] (N, V >= 1) into out."""
    N, V = x.shape
    cfg = launch_config(N, V, x.device)  # splits unused: one program per row
    return Launch(_kernels()._softmax_fwd_kernel, (N,),
                  (x, out, V, x.stride(0), out.stride(0), LOG2E / temperature),
                  dict(LOG=log, BLOCK=cfg.block, R=1 if cfg.one_block else cfg.rows, ONE_BLOCK=cfg.one_block,
                       num_warps=cfg.num_warps, STATIC_V=V if _interpreting() else 0))


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Gradient w.r.t. x of (log_)softmax(x / T), from its output y and the output gradient."""
    N, V = y.shape
    out = _empty(y.shape, y.dtype, y.device)
    if N == 0 or V == 0:
        return out
    softmax_backward_launch(y, grad_y, out, temperature, log)()
    return out


def softmax_backward_launch(y, grad_y, out, temperature, log) -> Launch:
    """softmax_backward's one launch for y, grad_y [N, V] (N, V >= 1) into out."""
    N, V = y.shape
    cfg = launch_config(N, V, y.device)
    return Launch(_kernels()._softmax_bwd_kernel, (N,),
                  (y, grad_y, out, V, y.stride(0), grad_y.stride(0), out.stride(0), 1.0 / temperature),
                  dict(LOG=log, BLOCK=cfg.block, num_warps=cfg.num_warps, STATIC_V=V if _interpreting() else 0))


# Top-k teachers: the k entries of a row are held in one block of registers; above this many
# the torch backend's implementation runs instead (offline pipelines store k in the tens/hundreds).
TOPK_MAX_K = 1024


def topk_kappa(code: int, param: float) -> tuple:
    """(kappa_s, kappa_t) of torch_math.kappa for the kernels' r terms: the same constants, except
    jsd, whose kernel r terms carry no log(beta), log(1 - beta) (the constants they cancel)."""
    if DIVERGENCES[code] == "jsd":
        return 0.0, 0.0
    return M.kappa(code, param)


def kd_topk_forward(student, ids, logprobs, labels, *, temperature, divergence, beta, soft_scale,
                    hard_weight, ignore_index, teacher_grad, mode=M.FULL, teacher_temperature=1.0):
    """Fused per-row loss and gradients against a sparse (top-k) teacher in `mode` (torch_math.FULL,
    RENORMALIZED, TAIL: the contract of kdkernels.ops.kd_topk_fused; torch_backend.kd_topk_forward
    is the same math). The k entries of a row sit in one block of registers. `launch_config`
    decides the vocabulary split: with one split, one program per row (PHASE 0); with few rows
    and a large vocabulary, (N, splits) programs: PHASE 1 writes per-(row, split) statistics
    ([N, splits, 6] float32), PHASE 2 combines them in every program, writes its span of the
    gradient (and the ids inside it), and split 0 writes the loss and the teacher gradient.
    Renormalized mode without a hard-label term reads the student only at the ids (one launch).
    Deterministic either way."""
    N, V = student.shape
    k = ids.shape[-1]
    if k > _TUNING.get("topk_max_k", TOPK_MAX_K):
        from . import torch_backend
        return torch_backend.kd_topk_forward(
            student, ids, logprobs, labels, temperature=temperature, divergence=divergence,
            beta=beta, soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
            teacher_grad=teacher_grad, mode=mode, teacher_temperature=teacher_temperature)
    dev = student.device
    loss = _empty((N,), torch.float32, dev)
    grad_s = _empty(student.shape, student.dtype, dev)
    grad_t = _empty(logprobs.shape if teacher_grad else (0,), logprobs.dtype, dev)
    if N == 0:
        return loss, grad_s, grad_t
    ids = ids.contiguous()
    logprobs = logprobs.contiguous()
    gt = grad_t if teacher_grad else loss  # never written when teacher_grad is False
    for launch in topk_launches(student, ids, logprobs, labels, loss, grad_s, gt, temperature=temperature,
                                divergence=divergence, beta=beta, soft_scale=soft_scale,
                                hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad,
                                mode=mode, teacher_temperature=teacher_temperature):
        launch()
    return loss, grad_s, grad_t


def topk_launches(student, ids, logprobs, labels, loss, grad_s, gt, *, temperature, divergence, beta,
                  soft_scale, hard_weight, ignore_index, teacher_grad, mode=M.FULL,
                  teacher_temperature=1.0) -> list:
    """kd_topk_forward's launches for N >= 1 rows (ids, logprobs contiguous [N, k]; gt: the
    teacher gradient, or any float32 tensor when teacher_grad is False)."""
    N, V = student.shape
    k = ids.shape[-1]
    # The block rule's block (next_pow2(V) for a short row, streamed all the same: the kernel has
    # no in-register path) and split; at least 4 warps (the k entries share the program).
    cfg = launch_config(N, V, student.device)
    warps = min(16, max(4, cfg.block // 512))
    has_hard = labels is not None and hard_weight != 0
    hard_sep = has_hard and (temperature != 1.0 or mode == M.RENORMALIZED)
    stats = _empty((N, cfg.splits, 6), torch.float32, student.device) if cfg.splits > 1 else loss
    inv_t = 1.0 / temperature
    deg, coef = series(divergence, beta)
    lp_scale = soft_scale if mode == M.TAIL else soft_scale * teacher_temperature * inv_t
    args = (student, ids, logprobs, labels if labels is not None else loss, loss, grad_s, gt, stats,
            V, k, student.stride(0), grad_s.stride(0), cfg.splits, cfg.span,
            LOG2E * inv_t, LOG2E, LOG2E * teacher_temperature * inv_t, beta, *topk_kappa(divergence, beta), *coef,
            soft_scale, soft_scale * inv_t, lp_scale, hard_weight, ignore_index)
    flags = dict(BLOCK=cfg.block, R=_rows_per_block(cfg.block, warps), KBLOCK=max(16, _next_pow2(k)),
                 SPLITS_P2=_next_pow2(cfg.splits), DIV=divergence, DEG=deg, MODE=mode,
                 HAS_LABELS=labels is not None, HAS_HARD=has_hard, HARD_SEP=hard_sep, TEACHER_GRAD=teacher_grad,
                 STATIC_SPAN=cfg.span if _interpreting() else 0, num_warps=warps)
    kernel = _kernels()._kd_topk_kernel
    if cfg.splits == 1:
        return [Launch(kernel, (N,), args, dict(flags, PHASE=0))]
    if mode == M.RENORMALIZED and not has_hard:  # no statistics over the vocabulary: one launch
        return [Launch(kernel, (N, cfg.splits), args, dict(flags, PHASE=2))]
    return [Launch(kernel, (N, cfg.splits), args, dict(flags, PHASE=phase)) for phase in (1, 2)]
