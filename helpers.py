"""The one module the notebooks import.

The plumbing grew past the ~600 lines a single file reads well at, so it lives in the small
``tutorial/`` package, one module per concern (model source, export, repository, local Triton,
registry, OCI, benchmarks, plots); this module re-exports the public names so every notebook
only needs ``import helpers``. Importing it is cheap: no TensorFlow, onnxruntime or OCI SDK.
"""

from tutorial.common import (  # noqa: F401
    OFFLINE_BANNER,
    REPO_ROOT,
    TEMPLATE_REPOSITORY,
    TutorialError,
    load_state,
    machine_metadata,
    model_info,
    paths,
    require_state,
    show_banner,
    update_state,
    weights_label,
    workdir,
)
from tutorial.export import (  # noqa: F401
    check_loadable_by_triton,
    convert_saved_model,
    empty_past,
    export_with_past,
    greedy_with_past,
    onnx_signature,
    ort_logits,
    ort_session,
    print_signature,
    quantize_int8,
    trim_to_last_logits,
)
from tutorial.model_source import (  # noqa: F401
    build_random_model,
    count_parameters,
    folder_size,
    hub_reachable,
    import_tensorflow,
    load_tf_model,
    load_tokenizer,
    offline_vocab_files,
    resolve_model_source,
    save_offline_vocab,
)
from tutorial.repository import (  # noqa: F401
    OCI_ARTIFACT_ROOT,
    OCI_REPOSITORY_PATH,
    assemble_repository,
    bytes_per_step,
    load_config,
    pack_artifact,
    validate_repository,
)
from tutorial.triton_local import (  # noqa: F401
    NGC_IMAGE,
    TritonServer,
    docker_available,
    start_local_triton,
)
from tutorial.registry import (  # noqa: F401
    DOCKERFILE,
    TRITON_BASE_IMAGE,
    TRITON_CMD,
    ContainerEngine,
    build_image,
    check_image_reference,
    find_engine,
    image_reference,
    ocir_host,
    ocir_username,
    push_image,
    record_image,
    registry_login,
    registry_logout,
    remove_local_image,
)
from tutorial.client import (  # noqa: F401
    infer_json,
    launch_local_triton,
    model_stats,
    next_token_requests,
    next_token_tritonclient,
    reference_generate,
    reference_text_loop,
    retokenizes_same,
    seed_payload,
    stats_table,
    text_loop,
)
