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
