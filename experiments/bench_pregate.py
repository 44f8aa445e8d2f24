"""Pre-gated expert residency as a system: peak expert memory and per-batch latency of three inference modes.

    python experiments/bench_pregate.py [--docs 64] [--batch-size 16] [--repeats 5] [--device cpu]

MiniLM-L6 with every layer upcycled (E = 8 and 16 experts, top-2, pre-gated), encoding SciFact documents:

- ``resident``: every expert resident in float32 (the plain upcycled model);
- ``on-demand``: experts stored packed (4 bits, groups of 128 columns), each dequantised when its layer
  reaches it, then dropped;
- ``ahead``: the same storage; a background worker dequantises layer l+1's experts (named by the pre-gate plan at
  layer l) while layer l computes, at most ``--lookahead`` experts ahead (on CUDA: copied on a side stream).

Latency: in one process, for 1 and 2 torch threads, every batch of every repeat is encoded by the three modes back
to back (rotating order), and the report takes medians over those rounds of the ratios to ``resident``, and the
hidden share ``(on-demand - ahead) / (on-demand - 1)`` of those ratios. Memory: expert bytes counted by the
residency (stored + peak of ready experts) against all experts in float32, and the peak RSS of one child process
per mode while it encodes (its peak reset after the model is built, via /proc/self/clear_refs; glibc's mmap
threshold fixed so freed buffers return to the system at once).
Results: experiments/results/bench_pregate.{json,md,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sbmoe.data import load_dataset  # noqa: E402
from sbmoe.files import write_atomic  # noqa: E402
from sbmoe.heads import MoELayersConfig  # noqa: E402
from sbmoe.model import build_model  # noqa: E402
from sbmoe.quant.residency import ExpertResidency  # noqa: E402

RESULTS = REPO / "experiments" / "results"
MODES = ("resident", "on-demand", "ahead")
EXPERTS = (8, 16)
THREADS = (1, 2)


def documents(count: int) -> list[str]:
    """The first ``count`` SciFact documents (title + abstract)."""
    return [doc.full_text for doc in islice(load_dataset("scifact", split="test").iter_docs(), count)]


def model_in_mode(experts: int, mode: str, cli: argparse.Namespace) -> tuple[Any, ExpertResidency | None]:
    """MiniLM-L6, every layer upcycled (top-2, pre-gated), its experts resident or under an ExpertResidency."""
    torch.manual_seed(0)
    moe = MoELayersConfig("all", num_experts=experts, top_k=2, pregate=True)
    model = build_model(moe=moe, max_seq_length=128, device=cli.device).eval()
    if mode == "resident":
        return model, None
    residency = ExpertResidency(model, mode, "packed", cli.bits, cli.group_size, lookahead=cli.lookahead)
    return model, residency


def batch_seconds(model: Any, batch: list[str], device: str) -> float:
    """Seconds to encode one batch."""
    start = time.perf_counter()
    model.encode(batch, batch_size=len(batch), convert_to_tensor=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def latency_part(cli: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """Per E and thread count: each batch of each repeat encoded by the three modes back to back (in rotating
    order), so one round's ratios see one load; and the residencies' expert bytes."""
    batches = [texts[i : i + cli.batch_size] for i in range(0, len(texts), cli.batch_size)]
    out: dict[str, Any] = {}
    for experts in EXPERTS:
        built = {mode: model_in_mode(experts, mode, cli) for mode in MODES}
        models = {mode: model for mode, (model, _) in built.items()}
        reference = models["resident"].encode(texts[:8], convert_to_tensor=True)
        agreement = {}
        for mode, model in models.items():
            y = model.encode(texts[:8], convert_to_tensor=True)  # also the warm-up
            agreement[mode] = torch.nn.functional.cosine_similarity(y, reference).min().item()
        for _, residency in built.values():
            if residency is not None:
                residency.reset_peak()
        for threads in THREADS if cli.device == "cpu" else (torch.get_num_threads(),):
            torch.set_num_threads(threads)
            rounds = []
            for repeat in range(cli.repeats):
                for b, batch in enumerate(batches):
                    turn = (repeat + b) % len(MODES)
                    order = MODES[turn:] + MODES[:turn]
                    rounds.append({mode: batch_seconds(models[mode], batch, cli.device) for mode in order})
            out[f"E={experts}, threads={threads}"] = summarize(rounds, experts, threads)
        memory = {}
        for mode, (_, residency) in built.items():
            if residency is not None:
                memory[mode] = residency.stats()
                residency.close()
        out[f"E={experts}, memory"] = {"expert_bytes": memory, "min_cosine_to_resident": agreement}
        del built, models
        gc.collect()
    return out


def summarize(rounds: list[dict[str, float]], experts: int, threads: int) -> dict[str, Any]:
    """Median batch seconds per mode, medians over rounds of the ratios to ``resident``, and the share of
    on-demand's extra time that ``ahead`` hides: ``(on-demand - ahead) / (on-demand - 1)`` in those ratios."""
    ratios = {mode: statistics.median(r[mode] / r["resident"] for r in rounds) for mode in MODES}
    extra = ratios["on-demand"] - 1.0
    return {
        "experts": experts,
        "threads": threads,
        "rounds": len(rounds),
        "batch_seconds": {mode: [r[mode] for r in rounds] for mode in MODES},
        "ratio_to_resident": ratios,
        "hidden_share": (ratios["on-demand"] - ratios["ahead"]) / extra if extra > 0 else None,
    }


def child(cli: argparse.Namespace, texts: list[str]) -> None:
    """One mode in this process: peak RSS while encoding, after the model is built (printed as JSON)."""
    torch.set_num_threads(1)
    model, residency = model_in_mode(cli.experts, cli.child, cli)
    model.encode(texts[:8], convert_to_tensor=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    model.encode(texts, batch_size=cli.batch_size, convert_to_tensor=True)
    result = {"mode": cli.child, "experts": cli.experts, "rss_before_kib": before, "peak_rss_kib": rss_kib("VmHWM")}
    if residency is not None:
        result["expert_bytes"] = residency.stats()
        residency.close()
    print(json.dumps(result))


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_part(cli: argparse.Namespace) -> list[dict[str, Any]]:
    """One child process per E and mode, one after another."""
    rows = []
    for experts in EXPERTS:
        for mode in MODES:
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--experts",
                str(experts),
                "--docs",
                str(cli.docs),
                "--batch-size",
                str(cli.batch_size),
                "--bits",
                str(cli.bits),
                "--group-size",
                str(cli.group_size),
                "--lookahead",
                str(cli.lookahead),
                "--device",
                cli.device,
            ]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed buffers go back to the system at once
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def device_expert_bytes(stats: dict[str, int], device: str) -> int:
    """Peak expert bytes in the device's memory: stored + ready on CPU; only the ready ones on a GPU (the stored
    experts stay in host memory)."""
    return stats["peak_ready_bytes"] + (stats["stored_bytes"] if device == "cpu" else 0)


def percent(share: float | None) -> str:
    """A share as a percentage ("-" when on-demand was not slower, so there was nothing to hide)."""
    return "-" if share is None else f"{100 * share:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    """Tables of latency ratios, hidden share and expert memory, and the issue's two goals."""
    lines = [f"# Pre-gated expert residency ({report['device']})", "", report["protocol"], ""]
    lines += [
        "| E | threads | resident s/batch | on-demand / resident | ahead / resident | hidden share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    latency = {k: v for k, v in report["latency"].items() if "threads" in k}
    for row in latency.values():
        r = row["ratio_to_resident"]
        seconds = statistics.median(row["batch_seconds"]["resident"])
        lines.append(
            f"| {row['experts']} | {row['threads']} | {seconds:.3f} | {r['on-demand']:.2f} | "
            f"{r['ahead']:.2f} | {percent(row['hidden_share'])} |"
        )
    lines += [
        "",
        "| E | mode | peak expert MB in device memory | share of all-resident fp32 | min cosine to resident |",
        "|---:|---|---:|---:|---:|",
    ]
    shares = {}
    for experts in EXPERTS:
        entry = report["latency"][f"E={experts}, memory"]
        for mode, stats in entry["expert_bytes"].items():
            used = device_expert_bytes(stats, report["device"])
            shares[(experts, mode)] = used / stats["resident_fp32_bytes"]
            lines.append(
                f"| {experts} | {mode} | {used / 1e6:.1f} (of {stats['resident_fp32_bytes'] / 1e6:.1f}) | "
                f"{shares[(experts, mode)]:.3f} | {entry['min_cosine_to_resident'][mode]:.4f} |"
            )
    if report.get("rss"):
        lines += ["", "| E | mode | RSS before encoding (MB) | peak RSS while encoding (MB) |", "|---:|---|---:|---:|"]
        for row in report["rss"]:
            lines.append(
                f"| {row['experts']} | {row['mode']} | {row['rss_before_kib'] / 1024:.0f} | "
                f"{row['peak_rss_kib'] / 1024:.0f} |"
            )
    ahead = [shares[(e, "ahead")] for e in EXPERTS]
    hidden = [row["hidden_share"] for row in latency.values()]
    memory_goal = "REACHED" if max(ahead) <= 0.25 else "not reached"
    hidden_goal = "REACHED" if all(h is not None and h >= 0.5 for h in hidden) else "not reached"
    lines += [
        "",
        "Goals:",
        f"- pre-gated peak expert memory <= 1/4 of all-resident: {memory_goal} ("
        + ", ".join(f"E={e}: {a:.3f}" for e, a in zip(EXPERTS, ahead, strict=True))
        + ")",
        f"- ahead hides >= 50% of on-demand's extra latency in every setting: {hidden_goal} ("
        + ", ".join(f"{name}: {percent(row['hidden_share'])}" for name, row in latency.items())
        + ")",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: batch latency per mode and setting (median over repeats); right: expert memory share per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = {k: v for k, v in report["latency"].items() if "threads" in k}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, mode in enumerate(MODES):
        values = [statistics.median(row["batch_seconds"][mode]) for row in latency.values()]
        left.bar([x + (i - 1) * width for x in range(len(values))], values, width, label=mode)
    left.set_xticks(range(len(latency)), [k.replace(", ", "\n") for k in latency], fontsize=8)
    left.set_ylabel("seconds per batch (median)")
    left.legend()
    for i, experts in enumerate(EXPERTS):
        stats = report["latency"][f"E={experts}, memory"]["expert_bytes"]
        values = [1.0] + [
            device_expert_bytes(s, report["device"]) / s["resident_fp32_bytes"]
            for s in (stats["on-demand"], stats["ahead"])
        ]
        right.bar([x + (i - 0.5) * 0.4 for x in range(3)], values, 0.4, label=f"E={experts}")
    right.axhline(0.25, color="grey", linestyle="--", linewidth=1)
    right.set_xticks(range(3), MODES)
    right.set_ylabel("peak expert memory / all-resident fp32")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the three modes")
    parser.add_argument("--bits", type=int, default=4, help="bits per packed expert weight")
    parser.add_argument("--group-size", type=int, default=128, help="input columns per packed scale")
    parser.add_argument("--lookahead", type=int, default=4, help="experts the ahead worker may hold ready")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a lent GPU (side-stream copies)")
    parser.add_argument("--no-rss", action="store_true", help="skip the child processes' peak RSS")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--experts", type=int, default=8, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    texts = documents(cli.docs)
    if cli.child:
        child(cli, texts)
        return
    protocol = (
        f"MiniLM-L6, all 6 layers upcycled (top-2, pre-gated), {cli.docs} SciFact documents at 128 tokens in "
        f"batches of {cli.batch_size}, {cli.repeats} repeats, {cli.bits}-bit packed experts "
        f"(groups of {cli.group_size} columns), lookahead {cli.lookahead}. Latency: each batch encoded by the three "
        "modes back to back (rotating order); medians over those rounds of the ratios to resident. On a shared "
        "CPU (other jobs run beside it) latencies are noisy (+-8% or worse); "
        "compare ratios. Expert memory: bytes counted by the residency (stored codes + peak of ready "
        "float experts)."
    )
    report = {
        "command": " ".join(["python experiments/bench_pregate.py", *sys.argv[1:]]),
        "device": cli.device,
        "cpu_count": os.cpu_count(),
        "protocol": protocol,
        "latency": latency_part(cli, texts),
        "rss": [] if cli.no_rss or cli.device != "cpu" else rss_part(cli),
    }
    suffix = "" if cli.device == "cpu" else "_" + cli.device.split(":")[0]
    write_atomic(RESULTS / f"bench_pregate{suffix}.json", json.dumps(report, indent=1) + "\n")
    write_atomic(RESULTS / f"bench_pregate{suffix}.md", markdown(report))
    plot(report, RESULTS / f"bench_pregate{suffix}.png")
    print((RESULTS / f"bench_pregate{suffix}.md").read_text())


if __name__ == "__main__":
    main()
