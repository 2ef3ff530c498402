"""Reliability suite (issue 7): crashes, bad inputs, numerics, logging outages, DDP faults.

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
"""
