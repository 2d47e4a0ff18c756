"""The CPU backend: the C++ kernel in ``ops/csrc/ms_deform_attn_cpu.cpp``, built with the machine's compiler."""
