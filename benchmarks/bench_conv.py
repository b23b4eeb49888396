"""Convolution forward, backward-data and backward-weight on the ResNet-18 shapes, every path.

    pytest benchmarks/bench_conv.py --bench-sets r18-28 --bench-paths cpu,torch
"""

from cnnfast import bench

OPS = ("conv",)


def test_conv(benchmark, op_item, candidate, runs):
    runs(candidate, op_item)
    run = bench.checked_op(op_item, candidate)       # fails here when the result is wrong
    benchmark.group = op_item.id
    benchmark.extra_info.update(path=candidate.name, shape=op_item.label,
                                gflop=op_item.flops() / 1e9)
    benchmark(run)
