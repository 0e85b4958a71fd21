"""The FLUX.1 backend (diffsynth). The only package that imports torch, diffsynth or modelscope.

    presets.py      memory presets as plain data (no torch)
    model_files.py  the model files: where, present or not, ModelScope downloads (no torch)
    pipeline.py     plan + paths -> diffsynth FluxImagePipeline (torch, diffsynth)
    backend.py      FluxBackend, the engine's backend seam

Import ``engine.flux.backend`` only when the FLUX backend is wanted: it pulls in torch.
"""
