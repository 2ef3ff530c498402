"""Reliability suite (issues 7 and 14): crashes, bad inputs, numerics, logging outages, DDP
faults; runs that are safe to repeat and to get wrong.

Item -> tests (``tr`` = tests/reliability; tests in other folders were already there)

1. Crash and resume
   - SIGKILL mid-epoch, resume, same losses bit for bit, same end state:
     ``tr/test_crash_resume.py::test_the_crash_happened_mid_epoch_after_a_checkpoint``,
     ``::test_resumed_losses_equal_the_uninterrupted_run_bit_for_bit``
   - W&B offline run continues under the same id:
     ``::test_wandb_offline_run_continues_under_the_same_id``
   - atomic checkpoint writes: ``::test_failed_save_leaves_the_previous_checkpoint``,
     ``::test_training_saves_through_the_atomic_plugin``, ``::test_sigkill_during_a_save``
   - in-process stop/resume (no crash): tests/integration/test_train.py::
     test_resume_continues_exactly
2. Bad configuration, one line at start-up:
   ``tr/test_startup_errors.py::test_bad_config_is_one_line`` (image vs patch size, channels vs
   head size, unknown experiment, unknown preset, schedule naming a missing block, more segments
   than tokens, negative tolerance, guidance without attention temperature),
   ``::test_fid_stats_of_another_resolution``, ``::test_debug_switch_keeps_the_traceback``,
   ``::test_console_script_prints_one_line``
3. Bad data
   - readers (missing, empty, corrupt, modes, npz shapes and labels): tests/unit/test_data.py
   - start-up through tarflow-train: ``tr/test_startup_errors.py::test_missing_data_root``,
     ``::test_empty_data_directory``, ``::test_bad_npz``
   - during training: ``tr/test_runtime_faults.py::
     test_a_few_corrupt_images_are_skipped_with_a_count``,
     ``::test_too_many_corrupt_images_fail_naming_the_last``
4. Bad checkpoints
   - loader (truncated, wrong architecture, pickle refused, Lightning vs plain):
     tests/unit/test_checkpoint.py
   - console scripts: ``tr/test_startup_errors.py::test_sample_truncated_checkpoint``,
     ``::test_sample_and_eval_missing_checkpoint``, ``::test_train_resume_from_bad_checkpoint``
5. Numerics
   - Jacobi overflow -> sequential fallback: tests/unit/test_sampling.py::
     test_overflow_falls_back_to_sequential_with_warning; in a validation round:
     ``tr/test_runtime_faults.py::test_sampling_callback_reports_the_overflow_fallback``
   - NaN loss: tests/integration/test_train.py::test_nonfinite_loss_raises (step 0);
     ``tr/test_runtime_faults.py::test_nan_loss_stops_before_a_poisoned_checkpoint`` (step 6)
6. Logging outages
   - no key -> offline, one warning: tests/integration/test_train.py::test_offline_resolution
   - no network -> offline, one warning: ``tr/test_runtime_faults.py::
     test_no_network_falls_back_to_offline_wandb_with_one_warning`` and, with the real client,
     ``::test_real_wandb_without_network_goes_offline`` (slow)
   - W&B cannot start at all -> CSV: tests/integration/test_train.py::
     test_wandb_failure_falls_back_to_csv
   - a logger raising during training: ``tr/test_runtime_faults.py::
     test_training_survives_a_logger_that_always_raises``,
     ``::test_media_logging_failures_are_contained``,
     ``::test_closing_a_crashed_wandb_run_only_warns``
7. DDP faults: ``tr/test_runtime_faults.py::test_a_failing_rank_ends_every_independent_rank``
   (tests/integration/test_sampling_callback.py::test_a_failing_rank_makes_every_rank_raise
   runs under ddp_spawn, whose launcher kills the other rank by itself: it passes with the
   shared failure flag removed too)

Issue 14, "runs are safe to repeat and to get wrong" (``ti`` = tr/test_sample_eval_input.py,
``ta`` = tr/test_resume_and_init.py; ``ta::refused[case]`` stands for
``ta::test_a_command_that_cannot_fit_is_refused_before_touching_anything[case]`` and
``ti::bad[case]`` for ``ti::test_bad_input_is_one_line_before_any_work[case]``):

1. The README's ``sampler.schedule="[3-8-32-10]"`` (a list once the shell strips the quotes):
   ``ti::test_the_readme_eval_command_reads_the_schedule_notation``; a list that is no
   schedule: ``ti::bad[sample-schedule-list]``
2. A resume that does not fit the checkpoint, one line, run dir byte for byte unchanged:
   ``ta::refused[model-mismatch]``; a new run aimed at an existing run:
   ``ta::refused[new-run-into-a-run]``
3. A resume keeps the run's config (restored overrides, new ones on top, warning, numbered
   records): ``ta::test_resume_restores_the_runs_own_config_and_keeps_its_records``; a moved
   run resumes into its own last.ckpt: ``ta::test_a_moved_run_resumes_into_its_own_checkpoints``
4. ``init_from`` (official .pth, a .ckpt's EMA weights):
   ``ta::test_init_from_starts_a_new_run_from_weights``; ``ckpt_path`` refuses bare weights:
   ``ta::refused[weights-as-ckpt-path]``; bad sources: ``ta::refused[garbage-init-from]``,
   ``[missing-init-from]``, ``[init-from-wrong-shapes]``, ``[both-keys]``
5. Sampling into a folder that holds samples: refuse (bytes unchanged) and overwrite:
   ``ti::test_sampling_into_a_folder_with_samples_is_refused_or_overwritten``; append a shard
   by index (overlap and another seed refused; shards equal one job):
   ``ti::test_appending_a_shard_of_the_same_set``
6. Eval on the checkpoint's own data: ``ti::test_eval_uses_the_data_the_checkpoint_was_trained_on``;
   another dataset and no record: ``ti::bad[eval-other-dataset]``, ``[eval-no-dataset-record]``;
   recorded at training time: tests/integration/test_train.py::
   test_checkpoint_holds_ema_weights
7. One line before any work: ``ti::bad[sample-num-samples-0]``, ``[sample-batch-size-0]``,
   ``[sample-dtype]``, ``[sample-cuda-without-gpu]``, ``[eval-negative-tol]``,
   ``[eval-missing-block]``, ``[sample-missing-block]``, ``[sample-label-out-of-range]``,
   ``[sample-label-on-uncond]``, ``[sample-guidance-on-uncond]``, ``[eval-fid-negative]``,
   ``[eval-nothing-enabled]``
8. Garbage checkpoints: ``ti::bad[sample-garbage]``, ``[eval-garbage]``,
   ``ta::refused[garbage-ckpt-path]``; the loader: tests/unit/test_checkpoint.py::
   test_garbage_files_are_not_checkpoints
9. tarflow-rank's schedule read back: tests/unit/test_cli_bench.py::
   test_the_printed_schedule_reads_back_as_a_sampler_schedule
10. ``--help``: ``ti::test_help_lists_only_what_works_there``; ``+model=tiny`` refused:
    ``ti::bad[sample-plus-model]``; ``sample.log``: ``ti::test_sampling_into_a_folder_with_
    samples_is_refused_or_overwritten``; ``evaluate.log``, absolute checkpoint paths in
    eval.json and an earlier eval.json kept on a repeat:
    ``ti::test_eval_uses_the_data_the_checkpoint_was_trained_on``; ``train.log``
    epochs and total time: ``ta::test_resume_restores_the_runs_own_config_and_keeps_its_records``;
    ``debug=fast_dev_run``: tests/integration/test_train.py::test_fast_dev_run; one CSV folder
    across a resume: tests/integration/test_train.py::test_wandb_offline_run_id_stable,
    ``tr/test_crash_resume.py::test_resumed_losses_equal_the_uninterrupted_run_bit_for_bit``;
    the sweep table: ``ti::test_an_eval_sweep_ends_with_a_table``

Issue 13, latent models (``tl`` = tests/integration/test_latent_*.py, ``ua`` =
tests/unit/test_autoencoder.py, ``ul`` = tests/unit/test_latents.py):

1. A missing or wrong autoencoder fails at start-up naming it and how to get weights:
   ``ua::test_missing_or_wrong_paths_say_how_to_get_weights``, ``tl_encode::
   test_refuses_bad_settings_before_reading_images``; a checkpoint's autoencoder missing on
   this machine, a copy as ``autoencoder_path``, other weights refused: ``tl_run::
   test_a_missing_autoencoder_is_refused_and_a_copy_can_stand_in``
2. Interrupted encoding: ``tl_encode::test_an_interrupted_encoding_resumes_and_keeps_finished_
   shards``; no half-written shard: ``ul::test_shards_are_written_whole_or_not_at_all``; an
   unfinished directory is never read: ``ul::test_unfinished_or_foreign_directories_are_refused``
3. Latents of another autoencoder or data: ``ul::test_manifest_guard_names_every_difference``,
   ``tl_run::test_latents_of_another_autoencoder_are_refused``; a resume with another
   autoencoder: ``tl_run::test_a_resume_with_another_autoencoder_is_refused``; a pixel metric
   monitored for a latent model: ``tl_run::test_a_pixel_checkpoint_callback_metric_is_refused_
   for_latent_models``

Issue 22, runs safe round 2 (``tb`` = tr/test_refusals_before_records.py):

1. Wrong-type overrides, one line before any record: ``tb::test_a_wrong_type_is_one_line_before_
   any_record`` (and ``tb::test_values_of_the_right_type_pass_the_type_check``)
2. Lightning's refusals before any record, no empty run dir left, existing dirs kept:
   ``tb::test_a_trainer_refusal_comes_before_any_record``, ``tb::test_a_gpu_experiment_without_
   a_gpu_is_refused_with_the_cpu_hint``; the log file held until start:
   ``tb::test_the_log_file_is_held_until_the_start_up_checks_pass``
3. ``trainer=cpu`` is one process, the start-up line: ``tb::test_trainer_cpu_under_an_8_gpu_
   experiment_is_one_process``, ``tb::test_the_start_up_line_reaches_train_log``
4. tarflow-bench: ``tr/test_bench_refusals.py::test_bad_bench_input_is_one_line``
5. FID references named by what they hold: ``tr/test_fid_reference_names.py``
6. Training sweeps: ``tr/test_train_sweep.py::test_a_training_sweep_ends_with_a_table_and_
   grouped_runs``
7. Eval's sampler: ``tr/test_eval_sampler.py::test_eval_samples_as_validation_did_and_says_so``,
   ``::test_the_sampling_callback_records_its_sampler``, ``::test_a_runs_records_stand_in_for_
   older_checkpoints``
8. ``--help`` and warnings in train.log: ``tr/test_train_help_and_log.py``

Issue 30, round 3 (defects 1, 3, 9, 11, 12):

1. FID references keyed by the source's files: ``tr/test_fid_reference_source.py``
3. Resume from a mid-epoch checkpoint: ``tr/test_resume_mid_epoch.py``
9. Resuming a finished run is refused, records untouched: ``tr/test_resume_finished.py``
11. A split prepared later joins the set: ``tr/test_prepare_input.py::test_a_split_prepared_
    later_joins_the_set``, ``::test_an_interrupted_added_split_resumes``
12. ``--img-size`` the source cannot give, 0, or a set larger than the disk:
    ``tr/test_prepare_input.py::test_sizes_the_source_cannot_give_are_refused_before_writing``,
    ``::test_a_set_larger_than_the_free_disk_space_is_refused``
"""
