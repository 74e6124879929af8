"""Test-session settings that must precede torch's import, and the suite's markers.

OpenMP threads wait passively: the suite shares its cores with other processes (and its own
torchrun workers, which inherit this), and spinning waiters made it 5-10x slower under load.
launch/threads.py says why; this is the same choice for the test process.

Markers (registered in pyproject.toml) are given here, by test module and test name, so that the
test files stay as they are:

    python -m pytest                    # the whole suite (what .ci/run runs)
    python -m pytest -m "not slow"      # the quick subset
    python -m pytest -m multirank       # only the tests that start several ranks

`multirank`: starts torchrun or several rank processes. `browser`: drives Chromium. `slow`: both
of those, and tests that start a server or a CLI in a subprocess, train, compile (dynamo or
inductor), run long streams, or build real-size models on the meta device: each took 15 s or more
of a loaded 2-core machine. A test moved to another folder keeps its markers (the module's file
name is the key).

The folders mirror the packages (models, plan, runtime, cache, serving, parallel, launch, demo);
project/ holds the rules that span every package (layering, style, docs, dependencies, families).
support/ holds no tests: the shared helpers, the model-free fakes and the rank workers that tests
launch by path. It goes on the path here, so that tests import them by bare name (`from helpers
import assert_close`); a worker run by path finds them beside itself. Test file names stay unique
across folders: pytest imports each test module by its bare name.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

ALL = "*"
"""Every test of the module."""

MULTIRANK = {
    "test_cascade": {"test_cascade_equals_one_device", "test_cascade_2_by_sp_2_equals_one_device",
                     "test_magi_cascade_equals_one_device", "test_a_failing_rank_stops_every_rank_with_its_name",
                     "test_generate_under_torchrun_with_a_decode_rank",
                     "test_parallel_auto_picks_a_split_and_says_why"},
    "test_sp": {"test_sp_2_3_4_equal_one_device", "test_generate_runs_the_sequential_plan_on_2_sp_ranks",
                "test_a_shared_stream_streams_on_2_sp_ranks"},
    "test_replicas": ALL,
    "test_faults": ALL,
    "test_multinode": ALL,
    "test_ranks_bench": {"test_a_pinned_two_rank_run_reports_its_fps"},
    "test_controls": {"test_accepted_prompts_reach_every_rank"},
    "test_groups": {"test_sessions_on_a_two_rank_cascade_equal_one_device",
                    "test_sessions_on_a_cascade_2_by_sp_2_equal_one_device",
                    "test_sessions_on_sp_2_with_the_sequential_plan_equal_one_device"},
    "test_group_server": ALL,
}  # fmt: skip

BROWSER = {
    "test_stream": {"test_the_viewer_page_in_chromium", "test_webrtc_both_ways_in_chromium",
                    "test_viewer_pages_get_their_own_sessions_and_share_links_join_them"},
}  # fmt: skip

SLOW = {
    "test_stream": ALL,  # a real server process with the demo model behind it
    "test_gpu_report": {"test_every_variant_reports_its_fields", "test_speed_options_ran_for_real",
                        "test_smaller_cards_stream_their_blocks_and_meet_the_offload_model",
                        "test_one_failure_stops_no_other", "test_steady_state_flops_match_the_analytic_count",
                        "test_throughput_model_received_the_measured_times", "test_markdown_table_renders",
                        "test_a_variant_past_its_time_is_killed_with_its_processes"},
    "test_demo": {"test_the_shipped_weights_stay_good_for_sixty_blocks", "test_training_steps_reduce_the_loss",
                  "test_the_shipped_weights_follow_their_prompts", "test_metric_reads_the_generators_own_clips"},
    "test_demo_rollout": {"test_training_resumes_bit_for_bit"},
    "test_compile": {"test_inductor_compiled_stream_matches_eager", "test_the_python_api_takes_the_speed_options",
                     "test_a_stream_compiles_few_graphs_and_none_once_the_window_slides",
                     "test_the_steady_state_tick_is_graph_ready",
                     "test_the_forward_traces_as_one_graph_through_the_cache_view"},
    "test_fp8_kv": {"test_fp8_cache_compiles_without_graph_breaks"},
    "test_coalesce": {"test_streams_in_shared_forwards_equal_each_stream_alone[demo]"},
    "test_streaming_load": {"test_a_load_holds_one_tensor_not_the_checkpoint"},  # a fresh process
    "test_kv": {"test_long_stream_with_eviction_matches_reference"},  # 1050 frames, six times
    "test_config": {"test_parameter_counts_match_published_sizes"},  # real-size models on the meta device
    "test_generate": {"test_cli_writes_the_preset_geometry_and_is_deterministic",
                      "test_cli_runs_skyreels_and_pyramid_plans",
                      "test_three_checkpoint_formats_give_identical_videos"},
    "test_magi": {"test_generate_cli_runs_the_tiny_preset"},
    "test_docs": {"test_the_quick_start_runs_as_written", "test_watching_it_live_serves_the_viewer_page",
                  "test_the_python_api_example_prints_what_it_says",
                  "test_the_presets_listing_is_what_the_command_prints"},
}  # fmt: skip


def _listed(table: dict, item) -> bool:
    """The item's module is marked whole, or lists the test by name (all its parameters) or by name
    with one parameter set (`test_x[demo]`)."""
    names = table.get(item.path.stem, ())
    return names == ALL or getattr(item, "originalname", item.name) in names or item.name in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        multirank, browser = _listed(MULTIRANK, item), _listed(BROWSER, item)
        if multirank:
            item.add_marker(pytest.mark.multirank)
        if browser:
            item.add_marker(pytest.mark.browser)
        if multirank or browser or _listed(SLOW, item):
            item.add_marker(pytest.mark.slow)
