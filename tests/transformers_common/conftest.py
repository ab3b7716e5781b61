# The harness files are named like test modules (as in transformers' repository) but hold mixins: only
# test_af2_common.py is collected, and it imports the harness of the installed release.
collect_ignore_glob = ["harness/*"]


def pytest_configure(config):
    # The markers transformers' root conftest.py registers and the harness uses.
    for marker in (
        "slow", "is_pipeline_test", "is_staging_test", "accelerate_tests", "not_device_test", "torch_compile_test",
        "torch_export_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "all_flash_attn_test",
        "training_ci", "tensor_parallel_ci", "fsdp_ci", "generate", "onnx_export_test", "executorch_export_test",
        "openvino_export_test", "dynamo_export_test",
    ):  # fmt: skip
        config.addinivalue_line("markers", f"{marker}: transformers test marker")
