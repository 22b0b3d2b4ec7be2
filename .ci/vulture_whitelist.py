"""vulture's false positives: names that something vulture cannot see reads (pydantic, dataclasses.asdict, ctypes,
pytest). vulture runs from scripts/test.sh with the settings in pyproject.toml ([tool.vulture]). Add a name here only
when it is read that way; a name nothing reads is dead code: delete it instead. Never run: only read by vulture."""
# ruff: noqa

# bench/summary.py: MethodFields, written to summary.json by dataclasses.asdict
ttft_ms, decode_tokens_per_s, speedup_together, together_ci_lo, together_ci_hi, mean_draft_len, mean_cut
bleu, rouge1, rouge2, rougeL, gsm8k_acc
_.ttft_ms, _.decode_tokens_per_s, _.speedup_together, _.together_ci_lo, _.together_ci_hi
_.bleu, _.rouge1, _.rouge2, _.rougeL, _.gsm8k_acc

# core/backends/llamacpp.py: llama.cpp's ctypes parameter structs, read by the C library
_.allow_requantize, _.nthread, _.n_ubatch, _.n_seq_max, _.kv_unified, _.n_threads, _.n_threads_batch
_.flash_attn_type, _.pooling_type, _.n_tokens, _.use_extra_bufts

# core/drafters/eagle.py: EagleConfig.target_layers, compared with the target's by dataclass equality
target_layers

# serve/requests.py: the pydantic request models (their config, a validator, and OpenAI fields refused by name)
model_config, _._named, include_obfuscation, user, frequency_penalty, presence_penalty, logit_bias, echo, best_of
logprobs, top_logprobs, tools, tool_choice, functions, function_call, parallel_tool_calls, response_format
modalities, audio, prediction, reasoning_effort, verbosity, web_search_options, store, service_tier

# tests: pytest's module marks, uvicorn's and tokenizers' attributes set from outside, a count checked by unpacking
pytestmark, _.should_exit, _.pre_tokenizer, second
