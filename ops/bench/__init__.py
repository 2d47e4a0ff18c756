"""The op's own tools: GPU checks and benchmarks (``gpu``), the CPU benchmark (``cpu``), the SASS report (``sass``)."""
