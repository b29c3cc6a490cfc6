"""Not a lesson: throughput benchmarks, the preset timings, the gradient reference check and the shipped
reference adapter."""
