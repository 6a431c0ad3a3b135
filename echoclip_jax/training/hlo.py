"""What a compiled step does, read from its optimized HLO text (echoclip_jax.aot's checks): matmul FLOPs by
operand dtype, host transfers, loops. Counted here, not taken from cost_analysis(), because the TPU
compiler writes many products as convolutions over padded size-1 axes, and a loop body's cost once."""

from __future__ import annotations

import math
import re

_DEF = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<dtype>\w+)\[(?P<shape>[\d,]*)\]\S*\s+(?P<op>[\w\-]+)\("
    r"(?P<args>[^)]*)\)(?P<attrs>.*)$"
)
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")  # a computation's header line (not indented)
_HOST = re.compile(
    r"is_host_transfer=true|custom_call_target=\"(MoveToHost|MoveToDevice|\w*callback\w*)\"|"
    r"\s(infeed|outfeed)\("
)


def _dims(s: str) -> list[int]:
    return [int(d) for d in s.split(",") if d]


def _mean_taps(attrs: str, labels, lhs: list[int], out: list[int]) -> float:
    """Mean number of window taps per output element that read a real input element. The TPU compiler writes
    batched and small matmuls as convolutions over padded or dilated size-1 "spatial" axes, where most taps
    read padding: counting every tap would overstate their FLOPs many times over."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=") for kv in window[1].split()) if window else {}
    spatial = [c for c in labels[1] if c.isdigit()]
    mean = 1.0
    for j in range(len(spatial)):
        get = lambda key, default: int(fields[key].split("x")[j]) if key in fields else default
        k, stride, ld, rd = get("size", 1), get("stride", 1), get("lhs_dilate", 1), get("rhs_dilate", 1)
        lo = int(fields["pad"].split("x")[j].split("_")[0]) if "pad" in fields else 0
        n, m = lhs[labels[1].index(str(j))], out[labels[3].index(str(j))]
        last = (n - 1) * ld
        hits = sum(
            1 for o in range(m) for t in range(k) if 0 <= (p := o * stride + t * rd - lo) <= last and p % ld == 0
        )
        mean *= hits / max(m, 1)
    return mean


def _trip_counts(text: str) -> tuple[dict, int]:
    """{computation: how many times one step runs it} from the call graph (a while body runs its known trip
    count times per call), and the number of while loops that run more than once."""
    calls, comp, consts, bound, whiles = {}, None, {}, {}, []
    for line in text.splitlines():
        head = _COMP.match(line)
        if head:
            comp = head[1]
            calls.setdefault(comp, [])
            continue
        if comp is None or "=" not in line:
            continue
        c = re.match(r"\s*%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", line)
        if c:
            consts[c[1]] = int(c[2])
        lt = re.match(r"\s*ROOT %[\w.\-]+ = pred\[\]\S* compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if lt and lt[1] in consts:  # a counted loop's condition: i < N
            bound[comp] = consts[lt[1]]
        if " while(" in line:
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            cond, body = re.search(r"condition=%([\w.\-]+)", line), re.search(r"body=%([\w.\-]+)", line)
            whiles.append((comp, body[1] if body else None, int(n[1]) if n else None, cond[1] if cond else None))
        for key, names in re.findall(
            r"(body|condition|calls|to_apply|branch_computations|called_computations)="
            r"(\{[^}]*\}|%[\w.\-]+)",
            line,
        ):
            for callee in re.findall(r"%([\w.\-]+)", names):
                calls[comp].append([callee, "body" if key == "body" else 1])
    # a while body runs its known trip count, else the N of its condition's `i < N` (counting from 0 by 1,
    # as jax's fori_loop and XLA's own loops do), else once
    loops = 0
    for caller, body, known, cond in whiles:
        trip = known or bound.get(cond, 1)
        loops += trip > 1
        for edge in calls[caller]:
            if edge[0] == body and edge[1] == "body":
                edge[1] = trip
                break
    runs = {}

    def visit(c, times):
        runs[c] = runs.get(c, 0) + times
        for callee, trip in calls.get(c, []):
            visit(callee, times * (trip if isinstance(trip, int) else 1))

    entry = re.search(r"^ENTRY %([\w.\-]+)", text, re.M)
    if entry:
        visit(entry[1], 1)
    return runs, loops


def scan_hlo(text: str) -> dict:
    """Matmul FLOPs by operand dtype (each instruction times the runs of its computation: while bodies count
    their trip count, which XLA's cost_analysis() counts once; `loop_matmul_flops` is what that misses), host
    transfers and loops, from an optimized
    HLO module's text (operands are named, not typed, in it: their types come from their own definitions)."""
    defs, matmuls, host, comp = {}, [], 0, None
    for line in text.splitlines():
        head = _COMP.match(line)
        if head:
            comp = head[1]
        if _HOST.search(line):
            host += 1
        m = _DEF.match(line)
        if m:
            defs[m["name"]] = (m["dtype"], _dims(m["shape"]))
            if m["op"] in ("dot", "convolution"):
                matmuls.append((comp, m))
    runs, loops = _trip_counts(text)
    by_dtype, f32_ops, repeated = {}, [], 0
    for comp, m in matmuls:
        names = re.findall(r"%([\w.\-]+)", m["args"])[:2]
        if len(names) < 2 or any(n not in defs for n in names):
            continue
        (lt, lhs), (rt, rhs) = defs[names[0]], defs[names[1]]
        if m["op"] == "dot":
            c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m["attrs"])
            contracted = math.prod(lhs[i] for i in _dims(c[1])) if c else 1
        else:  # convolution: input features x the window taps that meet real (unpadded, undilated) input
            labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", m["attrs"])
            if not labels:
                continue
            contracted = rhs[labels[2].index("i")] * _mean_taps(m["attrs"], labels, lhs, _dims(m["shape"]))
        once = int(2 * math.prod(_dims(m["shape"])) * contracted)
        flops = once * runs.get(comp, 1)
        repeated += flops - once
        dtype = "f32" if "f32" in (lt, rt) else lt
        by_dtype[dtype] = by_dtype.get(dtype, 0) + flops
        if dtype == "f32":
            f32_ops.append((flops, f"{m['op']} {lt}[{','.join(map(str, lhs))}] x {rt}[{','.join(map(str, rhs))}]"))
    f32_ops.sort(reverse=True)
    return {
        "matmul_flops_by_dtype": by_dtype,
        "host_transfers": host,
        "loops": loops,
        "loop_matmul_flops": repeated,
        "largest_f32_matmuls": [s for _, s in f32_ops[:3]],
    }
