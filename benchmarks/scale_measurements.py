"""Measurements for docs/scaling.md (8 simulated CPU devices; 2 shared CPU cores)."""

import json
import time

import dlkit
from dlkit import compute, step_wrappers

out = {}


def cfg_of(name, **sets):
    return dlkit.load_config(name, [f"{k}={v}" for k, v in sets.items()] + ["train.progress=false"])


# 1. FSDP vs data parallel: digits_mlp, 8 devices, 500 steps.
for sharding in ("replicated", "fsdp"):
    t = time.time()
    r = dlkit.fit(
        cfg_of(
            "digits_mlp",
            **{"train.steps": 500, "parallel.param_sharding": sharding, "train.eval_every": 0},
        )
    )
    out[f"fsdp/{sharding}"] = {
        "state_bytes_per_device": r.compute_report["state_bytes_per_device"],
        "peak_bytes_per_device": r.compute_report["memory"]["peak_bytes_per_device"],
        "final_train_loss": r.history.last("train/loss"),
        "eval_accuracy": r.history.last("eval/accuracy"),
        "steps_per_s": r.history.last("perf/steps_per_s"),
        "wall_s": time.time() - t,
    }
    print(sharding, out[f"fsdp/{sharding}"], flush=True)

# 2. Precision: digits_mlp on 1 device, 2000 steps.
for p in ("float32", "bfloat16", "float16"):
    t = time.time()
    r = dlkit.fit(cfg_of("digits_mlp", **{"train.precision": p, "parallel.num_devices": 1}))
    out[f"precision/{p}"] = {
        "train_loss": r.history.series("train/loss")[1][::4],
        "eval_accuracy": r.history.last("eval/accuracy"),
        "eval_loss": r.history.last("eval/loss"),
        "steps_per_s": r.history.last("perf/steps_per_s"),
        "wall_s": time.time() - t,
    }
    print(p, out[f"precision/{p}"], flush=True)

# 3. Memory from the compiled step: accumulation and remat, fashion_mnist_cnn, 1 device, batch 256.
for name, sets in {
    "base": {},
    "accum4": {"train.grad_accum_steps": 4},
    "remat": {"model.remat": "true"},
    "bf16": {"train.precision": "bfloat16"},
}.items():
    c = dlkit.build(
        cfg_of("fashion_mnist_cnn", **{"parallel.num_devices": 1, "train.batch_size": 256}, **sets)
    )
    st = c.abstract_state()
    # The run's step (with `train.grad_accum_steps` micro-batches) summing its metrics.
    fn = c.strategy.compile_train(
        step_wrappers.accumulating(c.train_step()), c.strategy.state_shardings(st)
    )
    comp = fn.lower(
        st, c.abstract_metrics(st), c.strategy.batch_spec(c.example_batch(), 256)
    ).compile()
    rep = compute.analyze(comp, c.strategy.devices)
    out[f"memory/{name}"] = {"flops_per_step": rep["flops_per_step"], **rep["memory"]}
    print(name, out[f"memory/{name}"], flush=True)

# 4. find-batch-size for fashion_mnist_cnn on 1 device with a 256 MiB budget.
t = time.time()
c = dlkit.build(cfg_of("fashion_mnist_cnn", **{"parallel.num_devices": 1}))
fb = compute.find_batch_size(c, memory_limit_bytes=256 * 2**20)
out["find_batch_size"] = {**fb, "wall_s": time.time() - t}
print("find", out["find_batch_size"], flush=True)

# 5. CPU peak and a short fashion_mnist_cnn run's MFU on 1 device.
r = dlkit.fit(
    cfg_of(
        "fashion_mnist_cnn",
        **{
            "parallel.num_devices": 1,
            "train.steps": 200,
            "train.log_every": 100,
            "train.eval_every": 0,
        },
    )
)
out["cnn_perf"] = {
    "flops_per_step": r.compute_report["flops_per_step"],
    "peak": r.compute_report["peak_flops_per_s"],
    "row": {k: v for k, v in r.history[-2].items()} if len(r.history) > 1 else r.history[-1],
}
print("cnn", out["cnn_perf"], flush=True)
json.dump(out, open("/tmp/scale/measure.json", "w"), indent=1)
