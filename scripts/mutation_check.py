"""Do the regression tests of "Real-model fidelity" (and of its second pass, the "P" entries) fail without their
fixes? Each mutation below puts one
defect back (a one-line edit), runs the test meant to catch it, and restores the file.

    python scripts/mutation_check.py [NAME ...]      # all, or those whose name contains one of NAME

Prints CAUGHT or MISSED per mutation. Run it on a clean working tree: it edits source files while it runs.
Two are expected to pass their tests, each covered twice over: "2a never shrink" (unloading restores the
saved rows anyway) and "7 budget in training" (the processor's own pixel limit is set too).
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
M = [
 ("1 rows on model device", "mmpersona/models/tokens.py", "generator=g).to(weight.device)", "generator=g)", "tests/test_tokens.py::test_training_runs_where_the_model_is"),
 ("2a never shrink", "mmpersona/models/tokens.py", "if len(tok) > rows:", "if len(tok) != rows:", "tests/test_tokens.py::test_unload_restores_the_original_rows_and_outputs_exactly"),
 ("2b restore rows", "mmpersona/models/tokens.py", "                weight[self.base_vocab:] = self._saved[name]", "                pass", "tests/test_tokens.py::test_unload_restores_the_original_rows_and_outputs_exactly"),
 ("3 handles kept", "mmpersona/models/tokens.py", "tok.add_tokens(list(tokens), special_tokens=False)", "tok.add_tokens(list(tokens), special_tokens=True)", "tests/test_tokens.py::test_handles_stay_in_answers_in_tokens_mode"),
 ("5 fp32 rows", "mmpersona/models/tokens.py", "rows[name] = mean + std * noise", "rows[name] = (mean + std * noise).to(weight.dtype)", "tests/test_tokens.py::test_half_precision_models_train_float32_rows"),
 ("16 one manager", "mmpersona/models/tokens.py", "if isinstance(existing, cls):", "if False:", "tests/test_tokens.py::test_learn_then_ask_with_the_same_model"),
 ("17a logits_to_keep", "pipelines/tokens.py", 'return "logits_to_keep" in inspect.signature(type(model).forward).parameters', "return False", "tests/test_tokens.py::test_what_does_not_change_is_computed_once"),
 ("17b tokenizer cache", "mmpersona/models/tokens.py", "TOKENIZER_CACHE = 8", "TOKENIZER_CACHE = 0", "tests/test_tokens.py::test_what_does_not_change_is_computed_once"),
 ("7+ checkpointing tokens", "pipelines/tokens.py", "gradient_checkpointing: bool = True", "gradient_checkpointing: bool = False", "tests/test_tokens.py::test_what_does_not_change_is_computed_once"),
 ("4 ddpm noise", "pipelines/dpo.py", "    return DDPMScheduler.from_config(pipe.scheduler.config)", "    return pipe.scheduler", "tests/test_dpo.py::test_training_noise_is_ddpm_even_after_sdxl_generated"),
 ("5 fp32 lora", "pipelines/dpo.py", "            p.data = p.data.float()\n", "", "tests/test_dpo.py::test_lora_trains_in_float32_in_a_half_precision_unet"),
 ("5 fp32 vae", "pipelines/dpo.py", "    if dtype != torch.float32:\n        vae.to(torch.float32)", "    if False:\n        vae.to(torch.float32)", "tests/test_dpo.py::test_lora_trains_in_float32_in_a_half_precision_unet"),
 ("6 no placement", "pipelines/dpo.py", "device_placement=False)", "device_placement=True)", "tests/test_dpo.py::test_dpo_and_generation_run_where_the_pipeline_is"),
 ("11 checkpointing dpo", "pipelines/dpo.py", "    gradient_checkpointing: bool = True", "    gradient_checkpointing: bool = False", "tests/test_dpo.py::test_dpo_and_generation_run_where_the_pipeline_is"),
 ("8 bf16 native", "mmpersona/devices.py", "is_bf16_supported(including_emulation=False)", "is_bf16_supported()", "tests/test_devices.py::test_bf16_only_where_the_gpu_has_it"),
 ("10 rerank cold", "pipelines/t2i.py", "        if run.reward.cold_start:  # every score", "        if False:  # every score", "tests/test_t2i.py::test_rerank_orders_by_reward_and_sidecar_metadata"),
 ("11 batches", "pipelines/t2i.py", "batch = self.batch_size or total", "batch = total", "tests/test_t2i.py::test_candidates_in_batches_give_the_same_images"),
 ("12 fp16 variant", "mmpersona/models/loaders.py", 'variant = "fp16" if _half(dt) else None', "variant = None", "tests/test_devices.py::test_half_precision_downloads_the_fp16_files"),
 ("13 labels by position", "pipelines/vlm.py", "self.prompts = PromptBuilder(budget, self.vlm.model_tokens(), interleaved=self.vlm.interleaves_images)", "self.prompts = PromptBuilder(budget, self.vlm.model_tokens(), interleaved=True)", "tests/test_vlm_pipeline.py::test_reference_images_are_added_within_budget"),
 ("14a adapter for local copies", "mmpersona/models/registry.py", '        adapter = PRESETS["default"][role].ip_adapter', "        adapter = None", "tests/test_registry.py::test_resolve_preset_and_explicit_ids"),
 ("14b defaults match loaded", "pipelines/t2i.py", "if self.t2i.ip_adapter or not STRATEGIES[n].needs_ip_adapter]", "]", "tests/test_registry.py::test_local_copy_of_sd_keeps_a_working_default"),
 ("15 weights check", "mmpersona/models/loaders.py", '    if not (path / "open_clip_model.safetensors").is_file():', "    if False:", "tests/test_registry.py::test_open_clip_directory_without_weights_is_an_error"),
 ("7 visual budget", "mmpersona/models/loaders.py", "DEFAULT_MAX_VISUAL_TOKENS = 1024", "DEFAULT_MAX_VISUAL_TOKENS = None", "tests/test_vlm_pipeline.py::test_a_phone_photo_costs_at_most_the_visual_budget"),
 ("7 budget in training", "mmpersona/models/loaders.py", "            self._prepared(messages), add_generation_prompt", "            messages, add_generation_prompt", "tests/test_tokens.py::test_training_images_stay_within_the_visual_budget"),
 ("newcomer quiet", "mmpersona/cli/__init__.py", "        quiet_libraries()", "        pass", "tests/test_cli.py::test_demo_output_is_the_clis_own"),
 ("pg private dir", "concept_db/local_pg.py", "    if user and not _reachable_by(user, bindir):", "    if False:", "tests/test_local_pg.py"),
 # "Real checkpoints, second pass"
 ("P1 process device", "mmpersona/devices.py", "            device = state.device", "            pass", "tests/test_adapter_training.py::test_each_process_loads_its_models_on_its_own_gpu"),
 ("P2 held-out chunks", "pipelines/adapter_training.py", "    chunk = config.eval_batch_size", "    chunk = 10**9", "tests/test_adapter_training.py::test_held_out_pairs_go_to_the_unet_in_chunks_with_the_same_result"),
 ("P4 time ids per image", "pipelines/adapter_training.py", "                            original, corner, (self.size, self.size)", "                            (self.size, self.size), (0, 0), (self.size, self.size)", "tests/test_adapter_training.py::test_sdxl_time_ids_carry_each_images_size_and_crop"),
 ("P5 sdxl zeros", "pipelines/preference_adapter.py", "negative_prompt=None if not cfg or (zeros and all(empty)) else negatives)", "negative_prompt=negatives if cfg else None)", "tests/test_adapter_training.py::test_viper_at_beta_0_and_preference_at_scale_0_are_vanilla"),
 ("P7 llava square", "mmpersona/models/loaders.py", "            img = pad_to_square(img, getattr(self.processor, \"image_processor\", None))", "            pass", "tests/test_square_inputs.py"),
 ("P8 dinov2 square", "mmpersona/instance.py", "images = [pad_to_square(load_image(x), self.processor) for x in batch]", "images = [load_image(x) for x in batch]", "tests/test_square_inputs.py"),
 ("P9 remote sized", "mmpersona/models/loaders.py", "content = [{**p, \"image\": self.sized_image(p[\"image\"])}", "content = [{**p, \"image\": self.prepare_image(p[\"image\"])}", "tests/test_remote_image_size.py"),
 ("P10 ip scale 0", "pipelines/adapter_training.py", "    with ip_adapter_scale(pipe, 0.0):", "    with contextlib.nullcontext():", "tests/test_adapter_training.py::test_training_runs_at_the_ip_adapter_scale_of_generation_and_restores_it"),
 ("P11 fp32 boxes", "mmpersona/models/loaders.py", "            return _float32(self.model(**inputs))", "            return self.model(**inputs)", "tests/test_detector_precision.py"),
 ("P12 gdino threshold", "mmpersona/models/loaders.py", "        return GROUNDING_DINO_THRESHOLDS[0] if self.joint_prompt else OWL_THRESHOLD", "        return OWL_THRESHOLD", "tests/test_detector_families.py"),
 ("P13 scale 0", "pipelines/preference_adapter.py", "    if scale == 0:\n        return prompt_embeds", "    if False:\n        return prompt_embeds", "tests/test_adapter_training.py::test_viper_at_beta_0_and_preference_at_scale_0_are_vanilla"),
]
only = sys.argv[1:]
results = []
for name, file, old, new, test in M:
    if only and not any(o in name for o in only):
        continue
    path = ROOT / file
    src = path.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    path.write_text(src.replace(old, new))
    try:
        proc = subprocess.run([PYTHON, "-m", "pytest", "-q", "-x", test, "-p", "no:cacheprovider"], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
    finally:
        path.write_text(src)
    caught = proc.returncode != 0
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    results.append((name, caught, last))
    print(f"{'CAUGHT ' if caught else 'MISSED '} {name}: {last}", flush=True)
print("missed:", [r[0] for r in results if not r[1]])
