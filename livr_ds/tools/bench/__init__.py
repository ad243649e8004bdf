"""`livr-ds bench`: measured ratios, printed as a table and written as JSON (not timed tests).

Benchmarks (each compares two things in the same process, same batch, interleaved repeats):
- stage:    train-step time, Stage 1 (bottleneck mask) vs Stage 2 (standard), per attention backend
- mask:     construction time and peak memory, dense bool mask vs flex BlockMask (uncompiled and
            compiled, as training builds it), L = 1k, 4k, 16k
- packing:  real-token fraction and tokens/s, packed vs padded rows, on the demo multi-task mix
- loader:   loader samples/s (decode + processor, per worker count) vs what a train step consumes;
            and stream vs indexed shard reads (samples/s, bytes read per sample) on the same shards
- trainer:  livr-ds's loop vs transformers Trainer + PEFT + DeepSpeed, same model, batches, global batch
- precision: a bf16 run's accumulated gradient with DeepSpeed accumulating in fp32 vs in bf16, per
            ZeRO config, against the exact sum and an fp32 run (relative L2 error)
- arch:     a published architecture (Qwen2.5-VL-3B, Qwen3-VL-4B) with random weights, bf16 on GPU:
            Stage 1 vs 2 per backend, tokens/s, MFU, memory
- eval:     on the same architectures: evaluation seconds per sample (KV-cached greedy generation,
            batch 1; and the recompute-per-token reference) vs seconds per training optimizer step
            (micro batch 1, forward + backward + AdamW on the plain LivrModel)
"""

from .runner import add_bench_command, format_tables, run_all

__all__ = ["add_bench_command", "format_tables", "run_all"]
