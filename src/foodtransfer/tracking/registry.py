"""The model registry: the champion of the latest pipeline execution, under an alias."""

from __future__ import annotations

from foodtransfer.tracking.store import retry_on_lock

CHAMPION_ALIAS = "champion"


def champion_uri(registered_model: str) -> str:
    """``models:/<registered_model>@champion``: what predict and serve use by default."""
    return f"models:/{registered_model}@{CHAMPION_ALIAS}"


def register_model_version(model_uri: str, name: str, alias: str, run_id: str,
                           tags: dict[str, str], description: str | None = None) -> str:
    """Register ``model_uri`` under ``name`` (or reuse the version already registered from
    it) and point ``alias`` at it; returns the version number."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = [version for version in retry_on_lock(client.search_model_versions)(
                    f"name = '{name}'")
                if version.source == model_uri and version.run_id == run_id]
    if existing:
        version = existing[0]
        for key, value in tags.items():
            retry_on_lock(client.set_model_version_tag)(name, version.version, key, value)
    else:
        version = retry_on_lock(mlflow.register_model)(model_uri, name, tags=tags)
    if description:
        retry_on_lock(client.update_registered_model)(name, description=description)
    retry_on_lock(client.set_registered_model_alias)(name, alias, version.version)
    return str(version.version)
