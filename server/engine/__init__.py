"""The serving engine: queue, pool-aware admission, continuous batching, sampling, streaming.

    request.py       what goes in and out (SamplingParams, GenerationRequest, RequestOutput, errors)
    config.py        EngineConfig (validated once, here) and ConfigError
    sampling_defaults.py  what a request gets for each sampling parameter it leaves out
    engine.py        Engine: the thread that owns the device; submit / cancel / shutdown
    core.py          one step: schedule, run the model, sample, detokenize, emit; failure isolation
    scheduler.py     continuous batching and admission;  pool_budget.py  expert-slot arithmetic
    model_runner.py  KV cache, model inputs, per-request expert-cache accounting
    sequence.py      what the scheduler sees of a request: token ids, limits, status, KV slot, pool
    request_state.py what the core keeps beside it: sampling state, detokenizer, output callback
    sampler.py, detokenizer.py, kv_slots.py, metrics.py
"""
