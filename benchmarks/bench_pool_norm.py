"""Max and average pooling, ReLU and training-mode batch norm, forward and backward, every path.

    pytest benchmarks/bench_pool_norm.py --bench-sets r18-28,r18-3d
"""

from cnnfast import bench

OPS = ("pool", "relu", "bn")


def test_pool_relu_bn(benchmark, op_item, candidate, runs):
    runs(candidate, op_item)
    run = bench.checked_op(op_item, candidate)
    benchmark.group = op_item.id
    benchmark.extra_info.update(path=candidate.name, shape=op_item.label)
    benchmark(run)
