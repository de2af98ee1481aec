"""pytest-benchmark setup for benchmarks/bench_*.py (run: ``pytest benchmarks --benchmark-only``).

``bench_*.py`` files are collected through ``python_files`` in pyproject.toml. Says in the header and in the
machine info which glibc allocator setting the figures were taken under (docs/design.md section 6) and records the
measured copy bandwidth next to them.
"""

from __future__ import annotations

from fusedres.bench import harness


def pytest_report_header(config) -> list[str]:
    setting = harness.allocator_setting()
    lines = [f"fusedres benchmarks: allocator {harness.describe_allocator(setting)}"]
    if not setting["no_page_fault_setting"]:
        env = " ".join(f"{k}={v}" for k, v in harness.ALLOCATOR_ENV.items())
        lines.append(f"  for page-fault-free figures (docs/design.md section 6) run with {env}")
    return lines


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["fusedres"] = harness.machine_info()
    machine_info["fusedres_copy_bandwidth"] = harness.copy_bandwidth()
