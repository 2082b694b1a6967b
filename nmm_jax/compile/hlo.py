"""What a compiled program does, read from its optimized HLO text: the collectives it runs,
with how often each executes (loop trip counts) and the bytes it moves."""
import collections
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+[({]")
# `%name = shape op(...)`; shape may be a tuple `(bf16[2,3]{1,0}, f32[4]{0})`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                     r"async_wrapped_computation)=\{?([^}\s]+(?:,\s*%[\w.\-]+)*)\}?")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_S32_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
# libtpu emits a reduce-scatter as a fusion that calls `%all-reduce-scatter.N`, a computation
# holding a padded all-reduce: one reduce-scatter, with the fusion's result.
_TPU_REDUCE_SCATTER = re.compile(r"calls=%?(all-reduce-scatter[\w.\-]*)")
# With the TPU flag preset's async collective fusion, a gather starts in an
# `async-collective-start` (whose computation holds it) and its consumers are fusions calling
# `%async_collective_fusion.N` computations that restate it: counted once, at the start.
_SKIPPED_COMPUTATIONS = ("all-reduce-scatter", "async_collective_fusion")
# The same preset splits a gather into a chain of fusions (its start, continuations and done),
# each restating the all-gather with the collective's channel and a `chain_id` attribute: one
# gather, however many links (early-275m on v5p-8: 778 gathers per step counted link by link,
# 442 as chains, the count without the preset).
_CHAIN = re.compile(r'chain_id="(\d+)"')
_CHANNEL = re.compile(r"channel_id=(\d+)")


def _arrays(shape_text: str) -> list:
  """[(dtype, bytes)] of the arrays in an HLO shape (one, or a tuple's)."""
  return [(dtype, _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(shape_text)]


def _computations(hlo_text: str) -> dict:
  """{computation name: [instruction lines]}."""
  out, current = {}, None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(1)
        out[current] = []
        if line.startswith("ENTRY"):
          out["__entry__"] = current
        continue
    if current is not None and line.startswith(" "):
      out[current].append(line)
  return out


def _trip_count(line: str, computations: dict) -> int:
  """Iterations of the while loop on `line`: XLA's known_trip_count where it is recorded, else
  the bound of its condition `counter < N` (JAX's scans count from 0 by 1)."""
  known = _TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line)
  body = computations.get(condition.group(1), []) if condition else []
  if any("direction=LT" in l for l in body if "ROOT" in l):
    bounds = [int(c) for l in body for c in _S32_CONSTANT.findall(l)]
    if len(bounds) == 1:
      return bounds[0]
  return 1


def _executions(computations: dict) -> dict:
  """How many times each computation runs per program execution: a while body or condition
  runs its trip count times per run of its caller."""
  calls = collections.defaultdict(list)   # callee -> [(caller, factor)]
  for name, lines in computations.items():
    if name == "__entry__":
      continue
    for line in lines:
      trip = _trip_count(line, computations) if " while(" in line else 1
      for role, targets in _CALLED.findall(line):
        factor = trip if role in ("body", "condition") else 1
        for target in re.findall(r"%?([\w.\-]+)", targets):
          calls[target].append((name, factor))
  memo = {computations["__entry__"]: 1}

  def runs(name, depth=0):
    if name not in memo:
      memo[name] = 0 if depth > 64 else sum(runs(caller, depth + 1) * factor
                                           for caller, factor in calls.get(name, ()))
    return memo[name]
  return {name: runs(name) for name in computations if name != "__entry__"}


def collectives(hlo_text: str) -> list:
  """[{kind, count, executed, bytes, dtypes}] per collective kind. `count`: ops in the
  program; `executed`: runs per step (ops in loop bodies times the trip count); `bytes`: the
  result bytes of every run, summed (async `-start` ops: the gathered/reduced result, not the
  operand copy in their tuple); `dtypes`: those bytes by element type. A ragged-all-to-all's
  result is its whole receive buffer, so its bytes bound the traffic, which the routing decides
  at run time."""
  computations = _computations(hlo_text)
  runs = _executions(computations)
  totals, chains = {}, set()
  for name, lines in computations.items():
    if name == "__entry__" or not runs.get(name) or name.startswith(_SKIPPED_COMPUTATIONS):
      continue
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape_text, op = match.groups()
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if op == "fusion" and _TPU_REDUCE_SCATTER.search(line):
        kind = "reduce-scatter"
      if kind not in COLLECTIVES:
        continue
      chain = _CHAIN.search(line)
      if chain:
        channel = _CHANNEL.search(line)
        link = (kind, chain.group(1), channel.group(1) if channel else None)
        if link in chains:  # a later link of a chain already counted
          continue
        chains.add(link)
      arrays = _arrays(shape_text)
      if op.endswith("-start") and len(arrays) > 1:
        # (operand(s), result(s)[, context]): the results are the second half of the arrays.
        arrays = arrays[len(arrays) // 2:] if kind != "collective-permute" else arrays[1:2]
      entry = totals.setdefault(kind, {"kind": kind, "count": 0, "executed": 0, "bytes": 0,
                                       "dtypes": {}})
      entry["count"] += 1
      entry["executed"] += runs[name]
      for dtype, size in arrays:
        entry["bytes"] += int(size) * runs[name]
        entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + int(size) * runs[name]
  return sorted(totals.values(), key=lambda e: -e["bytes"])
