"""A/B evidence for the change proposed in docs/benchmarks.md: MemVP as it is vs. with patches, same process.

    python docs/benchmarks/ab_patches.py 256 64 21 > docs/benchmarks/ab_patches_N256_T64.txt
    python docs/benchmarks/ab_patches.py 576 32 15 > docs/benchmarks/ab_patches_N576_T32.txt

Width-512 benchmark model, B=4, visual_dim 1024, N+64 slots; 1 torch thread; process CPU time; every variant runs
once per repeat, round-robin, and the reported ratio is the median of the per-repeat ratios to `current`.

Variants (monkeypatched, nothing in memvp_peft is edited):
  current               memvp_peft as is
  isfinite_sum          validate_visual_inputs checks finiteness with one fp32 sum (exact isfinite only if it fails)
  isfinite_sum+baddbmm  + FFNMemoryLayer.forward fuses `result + s * (a @ V)` into one torch.baddbmm
"""
import inspect, statistics, sys, time, torch
torch.set_num_threads(1)
from memvp_peft import bench, memory_context, visual_inputs, layer

src = inspect.getsource(visual_inputs.validate_visual_inputs)
assert "if not bool(torch.isfinite(image_features).all()):" in src
patched_src = src.replace("if not bool(torch.isfinite(image_features).all()):",
    "if not bool(torch.isfinite(image_features.sum(dtype=torch.float32))) and not bool(torch.isfinite(image_features).all()):")
ns = dict(visual_inputs.__dict__); exec(patched_src, ns)
orig_validate, new_validate = memory_context.validate_visual_inputs, ns["validate_visual_inputs"]

orig_forward = layer.FFNMemoryLayer.forward
def fused_forward(self, x, *args, **kwargs):
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:
        return result
    xb = self._batched(x)
    for name, keys, values in self._memories(xb):
        scores = self.memvp_activation[name](torch.matmul(xb, keys.transpose(-1, -2)))
        dropped = self.memvp_dropout[name](scores)
        if values.dim() == 3 and result.shape == xb.shape and result.dtype == values.dtype:
            result = torch.baddbmm(result, dropped, values, alpha=self.memvp_scale[name])
        else:
            read = torch.matmul(dropped, values) * self.memvp_scale[name]
            result = result + read.reshape(result.shape).to(result.dtype)
    return result

variants = {
    "current": (orig_validate, orig_forward),
    "isfinite_sum": (new_validate, orig_forward),
    "isfinite_sum+baddbmm": (new_validate, fused_forward),
}
args = bench.parse_args([])
base = bench.build_base_model(args)
N, T = int(sys.argv[1]), int(sys.argv[2])
batch = bench.make_batch(4, T, N, 1024, 2000, 0)
m = bench.MemVPMethod(base, 1024, N + 64, 128)
def use(v):
    memory_context.validate_visual_inputs, layer.FFNMemoryLayer.forward = variants[v]
res = {v: {"train": [], "prefill": []} for v in variants}
for v in variants:
    use(v); bench.time_train_step(m, batch); bench.time_prefill(m, batch)
reps = int(sys.argv[3])
for r in range(reps):
    for v in variants:
        use(v)
        res[v]["train"].append(bench.time_train_step(m, batch)["cpu"])
        res[v]["prefill"].append(bench.time_prefill(m, batch)[0]["cpu"])
for phase in ("train", "prefill"):
    cur = res["current"][phase]
    for v in variants:
        ratio = statistics.median([a / b for a, b in zip(res[v][phase], cur)])
        print(f"N={N} T={T} {phase:8s} {v:22s} median cpu {1e3*statistics.median(res[v][phase]):8.2f} ms  paired ratio vs current {ratio:.4f}")
