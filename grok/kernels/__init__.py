"""Kernels and the choice of them: the int8 block-matmul Pallas kernels (`pallas_int8`; Triton on
GPU, the Pallas interpreter elsewhere), their application to the model's weights (`moe_mlp`), and
the execution plan (`plan`) that decides, once per model, what runs where."""
