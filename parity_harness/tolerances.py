"""Per family: how far the converted HF model may be from the original on the same input,
element-wise `|hf - original| <= atol + rtol * |original| + scale_rtol * max |original|`
(scale_rtol 0 unless given). Each bound is the measured rounding gap of the two
implementations (stated beside it) with room to spare."""

TOLERANCE = {
    # float32, same op order as the original up to GEMM blocking
    "timesformer": dict(atol=2e-5, rtol=1e-4),
    # float32, the same operations as the original but another attention kernel
    # (nn.MultiheadAttention vs HF's eager attention): rounding only, measured at most
    # 9.5e-7 over all 18 tiny variants (logits are cosines scaled by exp(logit_scale) ~ 14).
    "xclip": dict(atol=1e-5, rtol=1e-4),
    # Flax/XLA vs torch in float32: the same maps through other kernels (einsum vs Linear,
    # XLA conv vs Conv3d, other summation orders), so rounding differs. Measured on the tiny
    # model with one compute thread: max abs 9.5e-7 on logits up to 3.3 (test_vivit_msn.py checks it);
    # exact GELU instead of the tanh one is 5.4e-4, far outside.
    "vivit": dict(atol=2e-5, rtol=1e-4),
    # torch vs torch in float32, the same maps (one fused qkv Linear vs three, HF's attention
    # kernel vs the original's matmuls): rounding only. Measured on the tiny models: at most
    # 1.25e-6 on last_hidden_state (final LayerNorm output, values up to ~4), on 4.57.6 and 5.23.0.
    "vit_msn": dict(atol=2e-5, rtol=1e-4),
    # float32 on both sides. The Fourier position features (frequencies up to res/2 = 112)
    # carry up to 1e-4 of float32 phase rounding in either implementation (8.4e-5 Haiku,
    # 2.8e-5 torch, against float64), which reaches the tiny fourier model's logits as
    # 4.1e-5; every other tiny output differs by at most 1.2e-5. The hub configs' exact
    # GELU is 4.3e-4 or more away from the original on every tiny model.
    #
    # scale_rtol: at full size the rounding grows with the output's scale, not each element's:
    # `convert --verify` on language-perceiver at full size (random weights, seed 0: 26 layers,
    # attended logits up to 104 in magnitude) measured a median difference of 2.0e-5, p99.9
    # 9.9e-5 and max 1.34e-4, that one on an element of 0.024, where atol + rtol*|e| allows 5.2e-5
    # (1.3e-6 of the output's scale; HF on 1 or 2 threads gives the same). The multimodal audio
    # output passed by 6% on the same rule. 1e-5 of the output's largest magnitude (1.0e-3 there)
    # leaves 7.8x room above that and stays 24x below the hub config's exact-GELU gap (0.025
    # there; >= 4.3e-4 on the tiny models, whose outputs are a few units: at most ~5e-5 more).
    "perceiver": dict(atol=5e-5, rtol=1e-4, scale_rtol=1e-5),
}
