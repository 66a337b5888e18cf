"""Online serving: a trained downstream model and its stores packaged as one bundle
(:mod:`~iat_torchrec.serving.bundle`), scored per request with the user's live history
(:mod:`~iat_torchrec.serving.scorer`), new instances ingested into the stores
(:mod:`~iat_torchrec.serving.ingest`), over HTTP (:mod:`~iat_torchrec.serving.server`).

    python apps/export_bundle.py --train_results outputs/.../results_iat.json --output bundle
    python apps/serve.py --bundle bundle --port 8000
"""
