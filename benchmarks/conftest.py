# `pytest benchmarks/ --benchmark-only` times every case through pytest-benchmark. Without --benchmark-only
# (or --benchmark-enable), each case runs once as a plain call (--benchmark-disable), so `pytest benchmarks/`
# only checks that every benchmark still runs and still computes what python_ref computes.


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (a trylast hook), which reads this option.
    if not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True
