"""The table of deliberate defects run by ``tests/test_mutants.py`` (see its docstring for the contract).

Each :class:`Defect` names one mechanism that matters, the file of ``wanrt/`` it lives in, the exact source
edits that break it (each anchor must occur exactly once in that file) and the narrowest test selection that
must fail once the edits are applied. Anchors are copied verbatim from the source, indentation included.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defect:
    """One deliberate defect.

    Attributes:
        name: short id (the parametrize id of its test).
        file: path relative to the ``wanrt`` package, e.g. ``"sampling/loop.py"``.
        edits: ``(anchor, replacement)`` pairs applied in order; each anchor must occur exactly once.
        tests: pytest node ids (relative to the repo root) of which at least one must fail.
        what: what the defect breaks, in words.
    """

    name: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    what: str


DEFECTS: tuple[Defect, ...] = (
    # ---------------------------------------------------------------------------- the denoising loop
    Defect(
        name="teacache-residual-dropped",
        file="sampling/loop.py",
        edits=(("return m.run_head(inp, inp.x.float() + residual)[0]",
                "return m.run_head(inp, inp.x.float())[0]"),),
        tests=("tests/test_teacache.py::test_skipped_step_is_head_of_input_plus_last_computed_residual[False]",),
        what="a TeaCache-skipped step runs the head on its input without the cached residual",
    ),
    Defect(
        name="teacache-calibration-against-first-step",
        file="cache/teacache.py",
        edits=(("self._prev[branch] = (modulated_input.detach().float().clone(), velocity.detach().float().clone())",
                "self._prev.setdefault(branch, (modulated_input.detach().float().clone(), velocity.detach().float()"
                ".clone()))"),),
        tests=("tests/test_teacache.py::test_calibration_record_records_each_branch_against_its_previous_step",),
        what="TeaCache calibration measures each step's change against the branch's first step, not its previous one",
    ),
    Defect(
        name="cfg-branches-swapped",
        file="sampling/loop.py",
        edits=(('return torch.lerp(velocities["uncond"], velocities["cond"], self.guidance_scale, out=self._out)',
                'return torch.lerp(velocities["cond"], velocities["uncond"], self.guidance_scale, out=self._out)'),),
        tests=("tests/test_core_guards.py::test_guided_velocity_is_uncond_plus_scale_times_difference[False]",),
        what="classifier-free guidance with cond and uncond exchanged: v_c + g(v_u - v_c)",
    ),
    Defect(
        name="cfg-wrong-base",
        file="sampling/loop.py",
        edits=(('return torch.lerp(velocities["uncond"], velocities["cond"], self.guidance_scale, out=self._out)',
                ('return torch.add(velocities["cond"], velocities["cond"] - velocities["uncond"], '
                 'alpha=self.guidance_scale, out=self._out)')),),
        tests=("tests/test_core_guards.py::test_guided_velocity_is_uncond_plus_scale_times_difference[True]",),
        what="guidance applied as v_c + g(v_c - v_u) instead of v_u + g(v_c - v_u)",
    ),
    # ---------------------------------------------------------------------------- schedules and solvers
    Defect(
        name="flow-shift-ignored",
        file="sampling/schedulers.py",
        edits=((("    base = _linspace_f64(_unipc_sigma_max(), 0.0, num_steps + 1)[:-1]  # float64 [n]\n"
                 "    return _finish_schedule(shift_sigmas(base, shift))"),
                ("    base = _linspace_f64(_unipc_sigma_max(), 0.0, num_steps + 1)[:-1]  # float64 [n]\n"
                 "    return _finish_schedule(base)")),),
        tests=("tests/test_schedulers.py::test_unipc_50_steps_shift_5_official_timesteps",),
        what="the UniPC schedule's sigmas are not shifted (sigma' = s*sigma / (1 + (s-1)*sigma) skipped)",
    ),
    Defect(
        name="engine-shift-not-passed",
        file="engine.py",
        edits=(("solver = make_solver(req.sample_solver, req.num_inference_steps, req.shift, schedule=req.schedule(),",
                "solver = make_solver(req.sample_solver, req.num_inference_steps, 1.0, schedule=req.schedule(),"),),
        tests=("tests/test_core_guards.py::test_generate_samples_on_the_shifted_schedule",),
        what="generate() builds its solver without the preset's / caller's shift",
    ),
    Defect(
        name="solver-x0-ring-not-advanced",
        file="sampling/schedulers.py",
        edits=(("x0 = ring[1] if preds and preds[-1] is ring[0] else ring[0]", "x0 = ring[0]"),),
        tests=("tests/test_schedulers.py::test_unipc_matches_diffusers_unipc[10-3.0]",),
        what="the multistep solvers' history of data predictions overwrites its newest entry instead of the oldest",
    ),
    # ---------------------------------------------------------------------------- the DiT
    Defect(
        name="rope-height-uses-frame-freqs",
        file="ops/rope.py",
        edits=(("fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),  # [F, H, W, h/2]",
                "ft[:h, : fh.shape[1]].view(1, h, 1, -1).expand(f, h, w, -1),  # [F, H, W, h/2]"),),
        tests=("tests/test_ops.py::test_rope_apply_matches_explicit_rotation[16-grid0]",),
        what="the height axis of 3-D RoPE rotated with the frame axis' frequencies",
    ),
    Defect(
        name="head-shift-scale-swapped",
        file="models/dit.py",
        edits=(("shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)",
                "scale, shift = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)"),),
        tests=("tests/test_dit.py::test_parity_with_diffusers[t2v]",),
        what="the head's modulation chunks read as (scale, shift) instead of (shift, scale)",
    ),
    Defect(
        name="ffn-gate-ignored",
        file="models/dit.py",
        edits=(("return x, (self.feed_forward(h), mod[5])", "return x, (self.feed_forward(h), torch.ones_like(mod[5]))"),),
        tests=("tests/test_dit.py::test_parity_with_diffusers[t2v]",),
        what="the blocks' gated FFN residual added without its gate",
    ),
    Defect(
        name="timestep-rescaled",
        file="models/dit.py",
        edits=(("pos = t.to(torch.float64)  # [B]", "pos = t.to(torch.float64) / 1000  # [B]"),),
        tests=("tests/test_dit.py::test_sinusoid_is_official_float64_cos_sin",),
        what="the timestep sinusoid fed t/1000 instead of t on the 0..1000 scale",
    ),
    # ---------------------------------------------------------------------------- attention masks
    Defect(
        name="t5-padding-key-mask-dropped",
        file="models/t5.py",
        edits=(("bias = bias.masked_fill(~key_mask, torch.finfo(x.dtype).min)  # [B, n, L, L]",
                "pass  # key mask dropped"),),
        tests=("tests/test_t5.py::test_padding_does_not_leak_into_real_tokens",),
        what="UMT5 self-attention attends to padded text tokens (the key-padding mask is not applied)",
    ),
    Defect(
        name="attention-k-lens-ignored",
        file="ops/attention.py",
        edits=(("        if bias is not None:\n            scores = scores + bias",
                "        if False:\n            scores = scores + bias"),),
        tests=("tests/test_ops.py::test_attention_key_lengths_mask_padded_keys",),
        what="the eager attention ignores k_lens (padded keys attended)",
    ),
    # ---------------------------------------------------------------------------- quantization
    Defect(
        name="fp8-weight-scale-dropped",
        file="quant/layers.py",
        edits=(("scale_b=self.weight_scale[None, :],", "scale_b=torch.ones_like(self.weight_scale)[None, :],"),),
        tests=("tests/test_quantization.py::test_quantized_linear_within_format_bound[fp8]",),
        what="the FP8 Linear's per-output-channel weight scale not applied in the scaled GEMM",
    ),
    Defect(
        name="int8-weight-scale-dropped",
        file="quant/layers.py",
        edits=(("y = acc.float() * xs * self.weight_scale[None, :]", "y = acc.float() * xs"),),
        tests=("tests/test_quantization.py::test_quantized_linear_within_format_bound[int8]",),
        what="the INT8 Linear's per-output-channel weight scale not applied after the int32 GEMM",
    ),
    Defect(
        name="quant-kernels-ignore-failed-self-check",
        file="ops/backends.py",
        edits=(('        quant = fused  # fused == "triton" passed every check above',
                '        quant = "triton" if "triton" in caps.packages and caps.device_type == "cuda" else "eager"'),),
        tests=("tests/test_plan.py::test_failed_self_check_runs_no_triton_quant_kernel[int8]",),
        what="the 8-bit Linears' Triton activation quantization chosen by 'CUDA and Triton installed', ignoring "
             "backend='eager' and a failed self-check",
    ),
    Defect(
        name="set-backend-leaves-linears-act-backend",
        file="models/dit.py",
        edits=(("                m.act_backend = backend.quant\n", "                pass\n"),),
        tests=("tests/test_plan.py::test_set_backend_gives_the_linears_the_plans_quant_backend",),
        what="re-planning a model leaves its 8-bit Linears on the activation-quantization kernel of the old plan",
    ),
    # ---------------------------------------------------------------------------- the VAE
    Defect(
        name="vae-causal-cache-one-frame",
        file="cache/causal_cache.py",
        edits=(("CACHE_T = 2\n", "CACHE_T = 1\n"),),
        tests=("tests/test_vae.py::test_encode_decode_parity[small-9]",),
        what="the causal 3-D convolutions keep one frame of history instead of two",
    ),
    Defect(
        name="vae-latent-stats-not-applied-on-decode",
        file="models/vae.py",
        edits=(("return z.float() / inv_std + mean", "return z.float()"),),
        tests=("tests/test_vae.py::test_encode_decode_parity[small-1]",),
        what="decode does not un-normalize the latents (z * std + mean skipped)",
    ),
    Defect(
        name="vae22-dupup-first-chunk-keeps-wrong-frame",
        file="models/vae.py",
        edits=(("            x = x[:, :, ft - 1:]", "            x = x[:, :, :1]"),),
        # "temporal_late": its time-doubling decoder stage halves the channels, so the duplicated frames differ (in the
        # released layout the time-doubling DupUp3D stages keep 1024 channels: their frames are equal, only the count
        # matters, and a shape check catches a wrong count)
        tests=("tests/test_vae22.py::test_encode_decode_parity[temporal_late-1]",),
        what="on the first latent frame the Wan2.2 DupUp3D shortcut keeps its first duplicated frame instead of the "
             "last (same shape, wrong values)",
    ),
    Defect(
        name="vae22-avgdown-shortcut-dropped",
        file="models/vae.py",
        edits=(("        return x + shortcut\n", "        return x\n"),),
        tests=("tests/test_vae22.py::test_encode_decode_parity[wan22-1]",),
        what="a Wan2.2 encoder stage returns its main path without the AvgDown3D shortcut",
    ),
    Defect(
        name="vae-latent-stats-not-applied-on-encode",
        file="models/vae.py",
        edits=(("return (mu.float() - mean) * inv_std", "return mu.float()"),),
        tests=("tests/test_vae.py::test_encode_decode_parity[small-1]",),
        what="encode does not normalize the latents ((mu - mean) / std skipped)",
    ),
    # ---------------------------------------------------------------------------- image conditioning
    Defect(
        name="i2v-mask-off-by-one-latent-frame",
        file="images.py",
        edits=(("table = seq.view(-1, tf).t()  # [tf, T']", "table = seq.view(-1, tf).t().roll(1, dims=1)  # [tf, T']"),),
        tests=("tests/test_images.py::test_mask_equals_official_81[False]",),
        what="the I2V/FLF2V 4-channel frame mask shifted by one latent frame",
    ),
    # ---------------------------------------------------------------------------- checkpoint loading checks
    Defect(
        name="both-layouts-resolved-silently",
        file="checkpoints/layout.py",
        edits=(("    _refuse_both_layouts(root)\n", ""),),
        tests=("tests/test_loading_checks.py::test_official_folder_with_a_diffusers_transformer_or_file_is_refused",),
        what="a folder holding the official and the diffusers layout loads one of them without a word",
    ),
    Defect(
        name="fused-clip-part-dtype-unchecked",
        file="checkpoints/io.py",
        edits=(("    parts = [(inner, k) for k in source.source_keys(key)] if inner is not None else [(source, key)]\n",
                "    parts = [(inner, k) for k in source.source_keys(key)[:1]] if inner is not None else [(source, key)]\n"),),
        tests=("tests/test_loading_checks.py::test_integer_tensor_in_clip_files_is_named",),
        what="only the first of the q/k/v tensors fused into to_qkv is checked: an integer v_proj loads as floats",
    ),
    Defect(
        name="shard-symlink-may-leave-the-folder",
        file="checkpoints/io.py",
        edits=(("        if not any(real.is_relative_to(home) for home in homes):\n", "        if False:\n"),),
        tests=("tests/test_loading_checks.py::test_shard_index_entries_must_stay_inside_the_folder",),
        what="a shard named by an index may be a symbolic link to a file outside the index's folder",
    ),
    Defect(
        name="shard-dotdot-checked-only-first-part",
        file="checkpoints/io.py",
        edits=(("    if \"..\" in parts:\n", "    if parts[0] == \"..\":\n"),),
        tests=("tests/test_loading_checks.py::test_shard_index_entries_must_stay_inside_the_folder",),
        what="an index entry such as sub/../../x.safetensors climbs out of the index's folder",
    ),
    Defect(
        name="hub-cache-shards-refused",
        file="checkpoints/io.py",
        edits=(("            homes = (path.parent.resolve(), path.resolve().parent)\n",
                "            homes = (path.parent.resolve(),)\n"),),
        tests=("tests/test_loading_checks.py::test_shard_links_inside_the_folder_and_the_hub_cache_still_load",),
        what="Hugging Face cache snapshots (every file a link into blobs/) are refused as leaving the folder",
    ),
    Defect(
        name="symlink-loop-read-as-missing",
        file="checkpoints/io.py",
        edits=(("        if not _is_loop(e):\n            return\n    parts = p.parts\n", "        return\n    parts = p.parts\n"),),
        tests=("tests/test_loading_checks.py::test_looping_tokenizer_file_is_named_not_skipped[tokenizer.json]",),
        what="a looping tokenizer file is skipped by transformers, which builds a degraded tokenizer without it",
    ),
    # ---------------------------------------------------------------------------- the engine
    Defect(
        name="prompt-cache-wrong-entry",
        file="conditioning.py",
        edits=(("self.cache.put(p, fresh[p])", "self.cache.put(p, fresh[missing[0]])"),),
        tests=("tests/test_core_guards.py::test_prompt_cache_returns_each_prompts_own_embedding",),
        what="the prompt LRU stores (and later returns) another prompt's embedding",
    ),
    Defect(
        name="negative-prompt-default-unused",
        file="request.py",
        edits=(('negative = p.negative_prompt if negative_prompt is None or negative_prompt == "" else negative_prompt',
                'negative = negative_prompt or ""'),),
        tests=("tests/test_core_guards.py::test_negative_prompt_defaults_to_the_presets",),
        what="without a negative prompt the unconditional branch encodes '' instead of the preset's default",
    ),
    Defect(
        name="cancel-checked-after-decode",
        file="engine.py",
        edits=(
            ("                x = denoise(step, solver, x, seed=req.seed, callback=callback, cancel=cancel,",
             "                x = denoise(step, solver, x, seed=req.seed, callback=None, cancel=None,"),
            ('        timings["total"] = time.perf_counter() - t_start\n',
             ('        timings["total"] = time.perf_counter() - t_start\n'
              '        if cancel is not None and cancel.is_set():\n'
              '            raise Cancelled(req.num_inference_steps - 1, final, req.seed)\n')),
        ),
        tests=("tests/test_core_guards.py::test_cancelled_generation_stops_at_the_step_and_never_decodes",),
        what="a cancelled generation stops denoising but still decodes (and streams frames) before raising",
    ),
    # ---------------------------------------------------------------------------- the request, judged before work
    Defect(
        name="steps-unbounded",
        file="request.py",
        edits=(("if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:", "if not _is_int(steps) or not 1 <= steps:"),),
        tests=("tests/test_engine.py::test_requests_are_judged_before_any_work",),
        what="num_inference_steps above 1000 (timesteps live on 0..1000) start a generation",
    ),
    Defect(
        name="guidance-not-checked-finite",
        file="request.py",
        edits=(('else _finite("guidance_scale", guidance_scale)', "else float(guidance_scale)"),),
        tests=("tests/test_engine.py::test_requests_are_judged_before_any_work",),
        what="a NaN guidance scale loads and runs the model, which then blames the DiT",
    ),
    Defect(
        name="memory-not-checked",
        file="engine.py",
        edits=(("        check_fits(req, self.preset, self.device,", "        (lambda *a, **k: None)(req, self.preset, self.device,"),),
        tests=("tests/test_engine.py::test_requests_are_judged_before_any_work",),
        what="a request larger than the device's memory starts work instead of being refused with the estimate",
    ),
    # ---------------------------------------------------------------------------- many GPUs (wanrt.parallel)
    Defect(
        name="ulysses-attends-padding",
        file="parallel/dit.py",
        edits=(("out = attention(q, k[:, :n], v[:, :n], backend=plan.attention)",
                "out = attention(q, k, v, backend=plan.attention)"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[ulysses]",),
        what="Ulysses attends the zero tokens that pad the sequence to a multiple of the ranks (the xDiT behaviour)",
    ),
    Defect(
        name="ring-block-lengths-of-own-block",
        file="parallel/ring.py",
        edits=(("        n = block_lens[source]\n", "        n = block_lens[dist.get_rank(group)]\n"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[ring]",),
        what="Ring attention masks each received K/V block with the valid length of this rank's own block",
    ),
    Defect(
        name="cfg-parallel-branches-swapped",
        file="parallel/step.py",
        edits=(("return torch.lerp(parts[1], parts[0], self.guidance_scale, out=self._out)",
                "return torch.lerp(parts[0], parts[1], self.guidance_scale, out=self._out)"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[cfg]",),
        what="CFG parallel combines the exchanged velocities with cond and uncond exchanged",
    ),
    Defect(
        name="sequence-parallel-rope-rows",
        file="parallel/dit.py",
        edits=(("rope = RopeTable.from_rot(rot[lo:hi])", "rope = RopeTable.from_rot(rot[:hi - lo])"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[ulysses]",),
        what="every rank rotates its token shard with the RoPE rows of the first shard",
    ),
    Defect(
        name="sequence-parallel-gather-order",
        file="parallel/dit.py",
        edits=(("return torch.cat(parts, dim=1)[:, :length]", "return torch.cat(parts[::-1], dim=1)[:, :length]"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[ring]",),
        what="the head's token shards are gathered in the wrong rank order",
    ),
    Defect(
        name="teacache-decisions-not-agreed",
        file="cache/teacache.py",
        edits=(("            compute = bool(self.agree(branch, compute)) or st.residual is None\n",
                "            self.agree(branch, compute)\n"),),
        tests=("tests/test_parallel_engine.py::test_cancel_and_nan_stop_every_rank_at_the_same_step",),
        what="each rank of a parallel run takes its own TeaCache decisions instead of the first rank's",
    ),
    Defect(
        name="rank-sync-local-only",
        file="parallel/step.py",
        edits=(("            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.mesh.world)\n", "            pass\n"),),
        tests=("tests/test_parallel_engine.py::test_cancel_and_nan_stop_every_rank_at_the_same_step",),
        what="the NaN check and the cancel are decided per rank: a cancel on one rank leaves the others running",
    ),
    Defect(
        name="sharded-weights-never-resharded",
        file="parallel/shard.py",
        edits=(("fully_shard(unit, mesh=dmesh, reshard_after_forward=True)",
                "fully_shard(unit, mesh=dmesh, reshard_after_forward=False)"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[shard]",),
        what="sharded Linears stay gathered after their forward (each is its own FSDP root): no memory is saved",
    ),
    Defect(
        name="parallel-decode-cache-dropped",
        file="parallel/vae.py",
        edits=(("parts = [vae.decode_chunk(latents[:, :, t:t + 1, tile.lat_h, tile.lat_w], cache)",
                "parts = [vae.decode_chunk(latents[:, :, t:t + 1, tile.lat_h, tile.lat_w], vae.new_decoder_cache())"),),
        tests=("tests/test_parallel_engine.py::test_parallel_tiled_vae_decode_is_bitwise_the_single_process_one",),
        what="a rank decodes each latent frame of its tile with a fresh causal cache instead of the tile's own",
    ),
    Defect(
        name="step-graphs-over-the-unsharded-dit",
        file="engine.py",
        edits=(("            self._graphs = make_step_graphs(self.dit)  # under sequence parallel the graph holds the",
                "            self._graphs = make_step_graphs(self.transformer)  # under sequence parallel the graph holds the"),),
        tests=("tests/test_parallel_engine.py::test_cancel_and_nan_stop_every_rank_at_the_same_step",),
        what="under sequence parallel the CUDA graphs capture the whole single-rank forward on every rank",
    ),
    # ---------------------------------------------------------------------------- offload (wanrt.offload)
    Defect(
        name="offload-no-prefetch",
        file="offload/mover.py",
        edits=(("        self._ensure(p + self.window - 1)  # S[m + k]: issued before S[m] computes\n",
                "        self._ensure(p)\n"),),
        tests=("tests/test_offload.py::test_mover_schedule[0-2]",),
        what="block offload copies each block just before it computes: nothing overlaps the compute",
    ),
    Defect(
        name="offload-one-slot-for-all",
        file="offload/mover.py",
        edits=(("        slot = position % self.window\n", "        slot = 0\n"),),
        tests=("tests/test_offload.py::test_mover_schedule[0-2]",),
        what="every streamed block is copied into the same slot, overwriting the block about to compute",
    ),
    Defect(
        name="offload-two-passes-per-step",
        file="engine.py",
        edits=(("(self.config.use_cfg_batch or streaming)", "self.config.use_cfg_batch"),),
        tests=("tests/test_offload.py::test_block_offload_batches_cfg_so_each_block_moves_once_per_step",),
        what="block offload with two CFG passes moves every block twice per step",
    ),
    Defect(
        name="planner-resident-from-the-largest-phase",
        file="offload/planner.py",
        edits=(('            spare = budget_bytes - least.phases["denoise"]', "            spare = budget_bytes - least.peak"),),
        tests=("tests/test_offload.py::test_planner_fills_the_budget_with_resident_blocks",),
        what="the planner sizes the resident blocks from the largest phase (the text encoder's), not denoising's",
    ),
    Defect(
        name="disk-placement-reads-block-0",
        file="offload/mover.py",
        edits=(('    return [f"{i}.{name}" if module is blocks[i] else f"{i}.{_path(blocks[i], module)}.{name}"',
                '    return [f"0.{name}" if module is blocks[i] else f"0.{_path(blocks[i], module)}.{name}"'),),
        tests=("tests/test_offload.py::test_disk_placement_gives_the_resident_video_bit_for_bit",),
        what="disk placement reads the first block's tensors for every streamed block",
    ),
    Defect(
        name="offload-slot-layout-overlaps",
        file="offload/mover.py",
        edits=(("                offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN\n",
                "                offset += _ALIGN\n"),),
        tests=("tests/test_offload.py::test_mover_schedule[0-2]",),
        what="a block's tensors are laid out 64 bytes apart in the slot, so they overwrite each other",
    ),
    Defect(
        name="disk-reads-without-the-header",
        file="offload/disk.py",
        edits=(("        base = 8 + n\n", "        base = 8\n"),),
        tests=("tests/test_offload.py::test_disk_placement_loads_no_block_until_it_is_placed",),
        what="disk placement reads tensors at offsets counted from the header's start, not the data's",
    ),
    Defect(
        name="defer-blocks-ignored",
        file="checkpoints/loaders.py",
        edits=(('                defer=(lambda k: k.startswith("blocks.")) if defer_blocks else (lambda k: False),',
                "                defer=lambda k: False,"),),
        tests=("tests/test_offload.py::test_disk_placement_loads_no_block_until_it_is_placed",),
        what="disk placement reads every block into host memory at load, then releases it",
    ),
    Defect(
        name="offload-plans-the-whole-sequence-per-rank",
        file="offload/placement.py",
        edits=(("    sp = mesh.sp if mesh is not None else 1\n", "    sp = 1\n"),),
        tests=("tests/test_parallel_engine.py::test_two_rank_layouts_match_one_process[offload]",),
        what="under sequence parallel the memory plan counts every token's activations on each rank",
    ),
    # ---------------------------------------------------------------------------- GGUF and ComfyUI files
    Defect(
        name="gguf-kernel-q5k-wrong-high-bit",
        file="kernels/gguf.py",
        edits=(("            q = q | (((_u8(raw_ptr, base + 16 + (l % 32), ok) >> j) & 1) << 4)",
                "            q = q | (((_u8(raw_ptr, base + 16 + (l % 32), ok) >> jj) & 1) << 4)"),),
        tests=("tests/kernels/test_gguf_dequant.py::test_kernel_matches_eager_and_the_gguf_package[Q5_K-torch.float32]",),
        what="the Triton Q5_K dequantizer takes the fifth bit of sub-block j from bit j mod 4",
    ),
    Defect(
        name="gguf-dequantizer-not-from-the-plan",
        file="models/dit.py",
        edits=(("                m.dequant_backend = backend.fused\n", '                m.dequant_backend = "eager"\n'),),
        tests=("tests/test_gguf.py::test_mixed_types_stream_through_block_offload_and_the_triton_dequantizer",),
        what="GGUF Linears dequantize eagerly whatever kernels the plan chose",
    ),
    Defect(
        name="gguf-k-scales-and-mins-swapped",
        file="quant/gguf.py",
        edits=(("    return torch.cat([sc_lo, sc_hi], dim=-1), torch.cat([m_lo, m_hi], dim=-1)",
                "    return torch.cat([m_lo, m_hi], dim=-1), torch.cat([sc_lo, sc_hi], dim=-1)"),),
        tests=("tests/test_gguf.py::test_dequantize_matches_the_gguf_package[Q4_K]",),
        what="Q4_K/Q5_K read the sub-block mins as scales and the scales as mins",
    ),
    Defect(
        name="gguf-q6k-offset",
        file="quant/gguf.py",
        edits=(("        q = torch.stack([q1, q2, q3, q4], dim=2).float() - 32",
                "        q = torch.stack([q1, q2, q3, q4], dim=2).float() - 31"),),
        tests=("tests/test_gguf.py::test_dequantize_matches_the_gguf_package[Q6_K]",),
        what="Q6_K values are centred on 31 instead of 32",
    ),
    Defect(
        name="scaled-fp8-scale-ignored",
        file="checkpoints/loaders.py",
        edits=(("            t = t.float() * self.src.get(scale).float()", "            t = t.float()"),),
        tests=("tests/test_comfy_files.py::test_scaled_fp8_text_encoder_with_its_embedded_tokenizer",),
        what="ComfyUI's scaled-fp8 text encoder loads its fp8 weights without their scale_weight",
    ),
    Defect(
        name="microbatch-first-sample-twice",
        file="models/dit.py",
        edits=(("        xs = [inp.x[g] for g in groups]\n", "        xs = [inp.x[groups[0]] for g in groups]\n"),),
        tests=("tests/test_offload.py::test_microbatched_blocks_match_the_batch",),
        what="micro-batching runs the first CFG sample's tokens for every sample",
    ),
    # ---------------------------------------------------------------------------- LoRA and few-step sampling
    Defect(
        name="lora-alpha-ignored",
        file="lora/formats.py",
        edits=(('            d.scale = float(parts["alpha"][1].float().reshape(-1)[0]) / a.shape[0]',
                "            d.scale = 1.0"),),
        tests=("tests/test_lora.py::test_formats_match_diffusers[official-down-up-alpha-1.0]",),
        what="a LoRA's alpha is ignored: the update is B A instead of (alpha / rank) B A",
    ),
    Defect(
        name="lora-kohya-names-unresolved",
        file="lora/formats.py",
        edits=(('        self.alias["lora_unet_" + official.replace(".", "_")] = official\n', ""),),
        tests=("tests/test_lora.py::test_formats_match_diffusers[kohya-1.0]",),
        what="kohya / musubi keys (lora_unet_blocks_0_self_attn_q) are not matched to the model's layers",
    ),
    Defect(
        name="lora-unload-keeps-the-fused-weights",
        file="lora/apply.py",
        edits=(("                    self._tensor(target, key).copy_(value)\n", "                    pass\n"),),
        tests=("tests/test_lora.py::test_fused_and_runtime_agree_and_unloading_restores_bit_for_bit[fp32]",),
        what="unloading a fused LoRA forgets its base copy without writing it back",
    ),
    Defect(
        name="lora-runtime-strength-not-updated",
        file="lora/apply.py",
        edits=(("            old.s.copy_(s)  # strengths only", "            pass  # strengths only"),),
        tests=("tests/test_lora.py::test_fused_and_runtime_agree_and_unloading_restores_bit_for_bit[fp32]",),
        what="a runtime LoRA keeps its first strength when the strength changes",
    ),
    Defect(
        name="lora-8bit-stale-scales",
        file="lora/apply.py",
        edits=(("            m.weight_scale.copy_(scale)\n", ""),),
        tests=("tests/test_lora.py::test_lora_on_8_bit_weights[int8]",),
        what="a LoRA fused into an 8-bit layer requantizes the weight but keeps the old per-channel scales",
    ),
    Defect(
        name="lora-runtime-reads-quantized-input",
        file="models/dit.py",
        edits=((' or any(hasattr(m, "lora_branch") for m in linears)', ""),),
        tests=("tests/test_lora.py::test_lora_on_8_bit_weights[int8]",),
        what="the fused norm keeps quantizing the input of 8-bit Linears that have a runtime LoRA branch",
    ),
    Defect(
        name="custom-timesteps-not-shifted",
        file="sampling/schedulers.py",
        edits=(("    shifted = shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift) if timesteps is not None else base",
                "    shifted = base / NUM_TRAIN_TIMESTEPS if timesteps is not None else base"),),
        tests=("tests/test_lora.py::test_the_4_step_recipe_against_a_hand_written_loop[euler]",),
        what="a custom timestep schedule is used without the flow shift the distilled models expect",
    ),
    Defect(
        name="lcm-renoise-to-the-current-sigma",
        file="sampling/schedulers.py",
        edits=(("        noise.mul_(nxt)  #", "        noise.mul_(self._sigma[i])  #"),
               ("        out.mul_(1 - nxt).add_(noise)", "        out.mul_(1 - self._sigma[i]).add_(noise)")),
        tests=("tests/test_lora.py::test_the_4_step_recipe_against_a_hand_written_loop[lcm]",),
        what="lcm re-noises the x0 prediction to the step's own sigma instead of the next one",
    ),
    Defect(
        name="lora-graphs-not-recaptured",
        file="engine.py",
        edits=(("                    graphs.plain.clear()\n                    graphs.with_residual.clear()\n",
                "                    pass\n"),),
        tests=("tests/test_lora.py::test_step_graphs_see_fused_changes_and_recapture_for_runtime_branches",),
        what="a runtime LoRA added after the step graphs were captured is never run (the graphs replay without it)",
    ),
    # ---------------------------------------------------------------------------- the service
    Defect(
        name="serve-restart-requeues-forever",
        file="serve/jobs.py",
        edits=(("            requeued = [i for i, a in rows if a < 2]\n            failed = [i for i, a in rows if a >= 2]",
                "            requeued = [i for i, a in rows]\n            failed = []"),),
        tests=("tests/test_serve.py::test_store_recovery_requeues_once_then_fails",),
        what="a job that crashed the server is re-queued after every restart instead of failing the second time",
    ),
    Defect(
        name="serve-no-auth",
        file="serve/app.py",
        edits=(('        if cfg.api_key and request.url.path not in ("/health", "/") and request.method != "OPTIONS":',
                '        if False and cfg.api_key and request.url.path not in ("/health", "/"):'),),
        tests=("tests/test_serve.py::test_uploads_auth_queue_limit_and_draining",),
        what="the server answers without checking the API key",
    ),
    Defect(
        name="serve-unbounded-queue",
        file="serve/app.py",
        edits=(("                                    max_queue=cfg.max_queue)", "                                    max_queue=None)"),),
        tests=("tests/test_serve.py::test_uploads_auth_queue_limit_and_draining",),
        what="a full queue keeps accepting jobs instead of answering 429",
    ),
    Defect(
        name="serve-cancel-ignores-running-jobs",
        file="serve/worker.py",
        edits=(("        if ev is not None:\n            ev.set()\n", "        if ev is not None:\n            pass\n"),),
        tests=("tests/test_serve.py::test_cancel_queued_and_running_jobs",),
        what="DELETE of a running job does not stop it",
    ),
    Defect(
        name="train-resume-forgets-optimizer",
        file="demo/train.py",
        edits=(('        ema.load_state_dict(state["ema"])\n        opt.load_state_dict(state["opt"])\n',
                '        ema.load_state_dict(state["ema"])\n'),),
        tests=("tests/test_demo_train.py::test_an_interrupted_run_resumes_to_the_same_weights",),
        what="a resumed DiT run restarts Adam's moments, so it no longer ends where an uninterrupted run ends",
    ),
    Defect(
        name="train-standardize-forgets-decoder",
        file="demo/train.py",
        edits=(("    w2 /= a.view(1, -1, 1, 1, 1)\n", ""),),
        tests=("tests/test_demo_train.py::test_standardizing_the_latents_keeps_the_reconstruction",),
        what="the latent re-standardisation rescales the encoder but not the decoder's input",
    ),
    Defect(
        name="train-object-mask-ignores-causal-chunks",
        file="demo/train.py",
        edits=(("    return torch.cat([first, F.max_pool3d(fg[:, :, 1:], (4, 8, 8))], dim=2)\n",
                "    return torch.cat([first, F.max_pool3d(fg[:, :, :-1], (4, 8, 8))], dim=2)\n"),),
        tests=("tests/test_demo_train.py::test_the_dit_loss_weighs_the_latent_positions_an_object_covers",),
        what="the DiT loss's object mask groups frames 0-3, 4-7 instead of the VAE's causal chunks 1-4, 5-8",
    ),
    Defect(
        name="adherence-gray-reads-as-a-colour",
        file="demo/adherence.py",
        edits=(("    return np.where(sat >= _MIN_SATURATION, nearest,",
                "    return np.where(sat >= 0.0, nearest,"),),
        tests=("tests/test_demo_data.py::test_the_colour_is_read_by_hue_so_dark_edges_keep_their_colour",),
        what="the adherence score gives unsaturated pixels (gray, dark blends) the colour of their hue",
    ),
    # ---------------------------------------------------------------------------- VACE
    Defect(
        name="vace-hint-before-the-block",
        file="models/dit.py",
        edits=(("                xs[j], pendings[j] = self._block(block, xs[j], pendings[j], inp, g)\n"
                "                if hints is not None and i in self._vace_after:",
                "                if hints is not None and i in self._vace_after and pendings[j] is None:\n"
                "                    xs[j] = xs[j] + next(hints[j]).float() * inp.vace_scale[0]\n"
                "                xs[j], pendings[j] = self._block(block, xs[j], pendings[j], inp, g)\n"
                "                if False:"),),
        tests=("tests/test_vace_dit.py::test_parity_with_diffusers[video-1.0]",),
        what="VACE hints are added to a block's input instead of its output (official: x = block(x) + hint)",
    ),
    Defect(
        name="vace-first-block-without-the-tokens",
        file="models/dit.py",
        edits=(("                c = block.before_proj(c) + inp.x[g].to(compute_dtype(block.before_proj))",
                "                c = block.before_proj(c)"),),
        tests=("tests/test_vace_dit.py::test_parity_with_diffusers[video-1.0]",),
        what="the first VACE block does not add the main stream's patch-embedded tokens to the hint stream",
    ),
    Defect(
        name="vace-mask-blocks-transposed",
        file="vace.py",
        edits=(("m = mask[0].reshape(f, h // sh, sh, w // sw, sw).permute(2, 4, 0, 1, 3)",
                "m = mask[0].reshape(f, h // sh, sh, w // sw, sw).permute(4, 2, 0, 1, 3)"),),
        tests=("tests/test_vace.py::test_generation_matches_a_loop_of_diffusers_modules[inpaint+reference]",),
        what="the 8x8 mask blocks fold into channels column-major (8*j + i) instead of row-major (8*i + j)",
    ),
    Defect(
        name="vace-reference-frames-decoded",
        file="engine.py",
        edits=(("            x = x[:, :, req.references:]\n", "            pass\n"),),
        tests=("tests/test_vace.py::test_generation_matches_a_loop_of_diffusers_modules[inpaint+reference]",),
        what="the reference images' latent frames are decoded as part of the video",
    ),
    Defect(
        name="vace-soft-mask-not-thresholded",
        file="vace.py",
        edits=(("    m = (mask > 0.5).to(torch.float32)\n", "    m = mask.to(torch.float32)\n"),),
        tests=("tests/test_vace.py::test_a_soft_mask_splits_the_video_at_one_half",),
        what="a soft mask blends the inactive and reactive videos instead of splitting the pixels at 0.5",
    ),
    Defect(
        name="tiny-preset-refuses-its-fixtures",
        file="presets.py",
        edits=(("        for i, candidate in enumerate((self.arch, *self.fixture_archs)):",
                "        for i, candidate in enumerate((self.arch,)):"),),
        tests=("tests/test_presets.py::test_the_tiny_preset_is_the_trained_size_and_accepts_its_random_fixtures",),
        what="the tiny preset no longer loads the random dim-64 test checkpoints",
    ),
    Defect(
        name="vae-conv-padding-dropped-on-cpu",
        file="models/vae.py",
        edits=(("        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, list(padding), list(stride),",
                "        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, [0, 0, 0], list(stride),"),),
        tests=("tests/test_demo_train.py::test_cpu_conv3d_goes_through_onednn_and_matches_the_reference",),
        what="the oneDNN convolution ignores the spatial zero padding",
    ),
    # ---------------------------------------------------------------------------- Wan2.2 A14B and TI2V sampling
    Defect(
        name="a14b-boundary-strict",
        file="sampling/loop.py",
        edits=(("    return [0 if float(t) >= threshold else 1 for t in timesteps]",
                "    return [0 if float(t) > threshold else 1 for t in timesteps]"),),
        tests=("tests/test_a14b.py::test_generation_matches_a_loop_of_two_diffusers_experts[at-a-timestep]",),
        what="the high-noise expert stops one timestep early (t > boundary instead of t >= boundary)",
    ),
    Defect(
        name="a14b-one-guidance-scale",
        file="engine.py",
        edits=(("        scales = (req.guidance_scale, req.guidance_scale_2)",
                "        scales = (req.guidance_scale, req.guidance_scale)"),),
        tests=("tests/test_a14b.py::test_generation_matches_a_loop_of_two_diffusers_experts[official]",),
        what="both experts guide with the high-noise expert's scale (the low-noise expert's guidance_scale_2 ignored)",
    ),
    Defect(
        name="a14b-experts-swapped",
        file="engine.py",
        edits=(("        for e, dit in enumerate((self.dit, self.dit_2)):",
                "        for e, dit in enumerate((self.dit_2, self.dit)):"),),
        tests=("tests/test_a14b.py::test_generation_matches_a_loop_of_two_diffusers_experts[official]",),
        what="the low-noise expert runs the high-noise steps and the other way round",
    ),
    Defect(
        name="a14b-swap-evicts-without-copy-back",
        file="offload/experts.py",
        edits=(("        module._apply(_to_host)\n", "        pass\n"),),
        tests=("tests/test_a14b.py::test_expert_swap_moves_one_expert_at_a_time",),
        what="an expert leaving the device is not copied back to the host (a LoRA fused while resident is lost)",
    ),
    Defect(
        name="ti2v-first-frame-not-kept",
        file="sampling/loop.py",
        edits=(("        out[:, :, : self.fixed.shape[2]] = self.fixed\n", ""),),
        tests=("tests/test_ti2v.py::test_generation_matches_a_loop_of_diffusers_modules[i2v]",),
        what="TI2V image-to-video lets the solver move the image's latent frame (not written back after each step)",
    ),
    Defect(
        name="ti2v-first-frame-tokens-not-at-t0",
        file="engine.py",
        edits=(("    mask[: (h // 2) * (w // 2)] = 0\n", ""),),
        tests=("tests/test_ti2v.py::test_generation_matches_a_loop_of_diffusers_modules[i2v]",),
        what="the image's tokens get the step's timestep instead of 0",
    ),
    # ---------------------------------------------------------------------------- Wan2.2 per-token timesteps
    Defect(
        name="per-token-t-first-token-for-all",
        file="models/dit.py",
        edits=(("            t, index = torch.unique(t, sorted=True, return_inverse=True)  # [K] distinct values, [B, L] rows",
                "            t, index = t[:, 0], torch.arange(t.shape[0], device=t.device)[:, None].expand_as(t)"),),
        tests=("tests/test_dit22.py::test_per_token_timesteps_match_diffusers",),
        what="every token of a sample takes the sample's first timestep (t[:, 0]) instead of its own",
    ),
    Defect(
        name="per-token-modulation-kernel-reads-row-0",
        file="kernels/modnorm.py",
        edits=(("    return 0 if t is None or t.shape[1] == 1 else t.stride(1)",
                "    return 0"),),
        tests=("tests/kernels/test_modnorm.py::test_per_token_modulation_matches_eager",),
        what="the fused modulated-norm kernels read the first token's modulation row for every token",
    ),
    Defect(
        name="sp-per-token-t-not-sharded",
        file="parallel/dit.py",
        edits=(("F.pad(inp.t_index, (0, shards.padded - shards.length))[:, lo:hi]",
                "F.pad(inp.t_index, (0, shards.padded - shards.length))[:, :hi - lo]"),),
        tests=("tests/test_dit22.py::test_sequence_parallel_per_token_timesteps_gloo",),
        what="every rank of a sequence-parallel run reads rank 0's per-token timestep rows",
    ),
)
