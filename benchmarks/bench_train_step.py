"""One training step (forward, cross-entropy, backward, SGD momentum step) per model and path:
SmallCNN (batch 64, 1x28x28), ResNet-18 (batch 32, 1x28x28), 3D ResNet-18 (batch 8, 1x28^3).

    pytest benchmarks/bench_train_step.py --bench-models smallcnn,resnet18
"""

from cnnfast import bench


def test_train_step(benchmark, model_spec, candidate, runs):
    runs(candidate, model_spec)
    step = bench.checked_step(model_spec, candidate)   # loss and gradients vs the reference
    benchmark.group = f"step.train/{model_spec.name}"
    benchmark.extra_info.update(path=candidate.name, batch=model_spec.batch)
    benchmark(step)
