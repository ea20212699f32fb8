"""
LiteLLM's model management: C{/model/new}, C{/model/update} (and PATCH
C{/model/{id}/update}), C{/model/delete}, C{/model/info} (and
C{/v1/model/info}), C{/v2/model/info}, C{/model_group/info}.

Models added here are entries of the operator model table
(C{CLLAMA_MODEL_TABLE}, LiteLLM's C{model_list} shape), kept in the
directory (so every instance serves them) and put after the file's own
entries: a model name both define is served by both, the file's first.
An entry is checked as the table checks its own before it is stored; one
the proxy cannot serve (an unsupported provider, an unset
C{os.environ/} variable) is refused with the table's reason.  An entry's
C{api_key} is never shown: C{/model/info} says only where the key comes from.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.logger import Logger

from cllama_tx.identity import litellm_fields as f
from cllama_tx.providers.model_table import ModelTableError
from cllama_tx.sites.admin_http import KeyApiError, arg, json_answer, read_body
from cllama_tx.sites.directory_api import RecordApi, new_id, record_answers

__all__ = ["ModelsApi"]

log = Logger(namespace="cllama_tx.sites.models")

_PER_MILLION = 1_000_000
#: What of an entry's litellm_params may be shown (never api_key).
_SHOWN_PARAMS = ("model", "api_base", "api_version", "rpm", "tpm", "max_tokens", "timeout",
                 "input_cost_per_token", "output_cost_per_token")


def _entry_of(doc: dict) -> dict[str, Any]:
    """A /model/new body as a model table entry (checked for shape)."""
    name = f.text("model_name", doc.get("model_name"))
    if name is None:
        raise KeyApiError(400, "'model_name' is required: the name clients send", "model_name")
    params = doc.get("litellm_params")
    if not isinstance(params, dict) or not isinstance(params.get("model"), str) or not params["model"]:
        raise KeyApiError(400, "'litellm_params' must be an object with 'model' (<provider>/<model>)",
                          "litellm_params")
    info = doc.get("model_info") or {}
    if not isinstance(info, dict):
        raise KeyApiError(400, "'model_info' must be an object", "model_info")
    return {
        "model_name": name,
        "litellm_params": f.json_value("litellm_params", params),
        "model_info": f.json_value("model_info", info),
    }


class ModelsApi(RecordApi):
    """
    @param table: the L{cllama_tx.providers.model_table.ModelTableFile} in force.
    @param pricing: the pricing table (prices and output limits in the answers).
    """

    kind = "model"

    def __init__(self, auth: Any, directory: Any, keys: Any, budgets: Any, audit: Any = None, *,
                 table: Any = None, pricing: Any = None, clock: Any = None) -> None:
        super().__init__(auth, directory, keys, budgets, audit)
        self.table = table
        self.pricing = pricing
        self._clock = clock
        self._scheduled = False
        if directory is not None and table is not None:
            directory.on_change.append(self._changed)

    # -- the table follows the directory (here and on every instance)

    def stored_entries(self) -> list[dict]:
        return [
            {"model_name": m["model_name"], "litellm_params": m["litellm_params"],
             "model_info": {**(m.get("model_info") or {}), "id": m["model_id"]}}
            for m in self.directory.all("model")
        ]

    def _changed(self, kind: str, _record_id: str) -> None:
        if kind != "model" or self._scheduled:
            return
        if self._clock is None:
            self.apply()
            return
        self._scheduled = True
        self._clock.callLater(0, self.apply)

    def apply(self) -> None:
        """Serve the stored models (called after every change of one)."""
        self._scheduled = False
        try:
            self.table.set_stored(self.stored_entries())
        except ModelTableError as e:
            log.error("stored models: the model table cannot take them: {error}", error=str(e))

    # -- answers

    def _deployments(self) -> list[tuple[Any, str, bool]]:
        """Every deployment in force: (deployment, id, stored).  The stored ones come last, in their order."""
        if self.table is None:
            return []
        deployments = self.table.current.deployments
        stored_ids = [e["model_info"]["id"] for e in self.table.stored]
        first_stored = len(deployments) - len(stored_ids)
        out = []
        for index, deployment in enumerate(deployments):
            if index >= first_stored:
                out.append((deployment, stored_ids[index - first_stored], True))
            else:
                digest = hashlib.sha256(f"{index}:{deployment.public_name}:{deployment.ref}".encode()).hexdigest()
                out.append((deployment, digest[:32], False))
        return out

    def _info(self, deployment: Any, model_id: str, stored: bool) -> dict[str, Any]:
        price = deployment.price
        if price is None and self.pricing is not None:
            price = self.pricing.price(deployment.ref.provider, deployment.ref.model)
        record = self.directory.model(model_id) if stored else None
        params: dict[str, Any] = {}
        if record is not None:
            params = {k: v for k, v in record["litellm_params"].items() if k in _SHOWN_PARAMS}
        params.update(model=_litellm_model(deployment), api_base=deployment.api_base)
        info = dict(record.get("model_info") or {}) if record is not None else {}
        info.update(
            id=model_id,
            db_model=stored,
            mode="chat",
            litellm_provider=deployment.ref.provider,
            key=deployment.ref.model,
            input_cost_per_token=price.input / _PER_MILLION if price is not None else None,
            output_cost_per_token=price.output / _PER_MILLION if price is not None else None,
            max_output_tokens=getattr(price, "max_output_tokens", None),
            max_tokens=getattr(price, "max_output_tokens", None),
            api_key_source=deployment.key_source or "the provider's keys",
            problem=deployment.problem,
        )
        return {"model_name": deployment.public_name, "litellm_params": params, "model_info": info}

    @record_answers
    async def info(self, request: Any) -> bytes:
        """C{GET /model/info} (C{/v1/model/info}, C{/v2/model/info}) C{?litellm_model_id=}: the models in force."""
        self.master(request)
        wanted = arg(request, "litellm_model_id") or arg(request, "model_id")
        data = [self._info(d, i, s) for d, i, s in self._deployments() if wanted is None or i == wanted]
        if wanted is not None and not data:
            raise KeyApiError(404, f"model not found: {wanted}", "litellm_model_id")
        return json_answer(request, 200, {"data": data})

    @record_answers
    async def group_info(self, request: Any) -> bytes:
        """C{GET /model_group/info?model_group=}: each public model name and its deployments."""
        self.master(request)
        wanted = arg(request, "model_group")
        groups: dict[str, dict[str, Any]] = {}
        for deployment, _id, _stored in self._deployments():
            info = self._info(deployment, _id, _stored)["model_info"]
            group = groups.setdefault(deployment.public_name, {
                "model_group": deployment.public_name,
                "providers": [],
                "mode": "chat",
                "input_cost_per_token": info["input_cost_per_token"],
                "output_cost_per_token": info["output_cost_per_token"],
                "max_output_tokens": info["max_output_tokens"],
                "max_input_tokens": None,
                "tpm": None,
                "rpm": None,
                "supports_function_calling": True,
                "supports_vision": False,
                "configurable_clientside_auth_params": None,
            })
            if deployment.ref.provider not in group["providers"]:
                group["providers"].append(deployment.ref.provider)
        if self.table is not None:
            for alias, target in self.table.current.aliases.items():
                if alias not in groups and target in groups:
                    groups[alias] = {**groups[target], "model_group": alias}
        data = [g for name, g in groups.items() if wanted is None or name == wanted]
        return json_answer(request, 200, {"data": data})

    def _check(self, entries: list[dict], new: dict) -> None:
        """Refuse an entry the table would not serve (its reason as the 400's message)."""
        if self.table is None:
            raise KeyApiError(503, "models cannot be added: there is no model table")
        try:
            table = self.table.compose(entries)
        except ModelTableError as e:
            raise KeyApiError(400, str(e).replace("the stored models: ", ""), "litellm_params") from None
        for deployment in table.deployments:
            if deployment.public_name == new["model_name"] and deployment.problem is not None:
                raise KeyApiError(400, f"model {new['model_name']!r} cannot be served: {deployment.problem}",
                                  "litellm_params")

    @record_answers
    async def new(self, request: Any) -> bytes:
        """C{POST /model/new} C{{"model_name", "litellm_params", "model_info"}}."""
        self.master(request)
        doc = read_body(request)
        entry = _entry_of(doc)
        model_id = f.text("model_info.id", entry["model_info"].get("id")) or new_id()
        self._check([*self.stored_entries(), entry], entry)
        await self.directory.create("model", model_id, entry)
        self.apply()
        self.operator("model_added", model_id=model_id, model_name=entry["model_name"])
        return json_answer(request, 200, self._answer(model_id))

    def _answer(self, model_id: str) -> dict[str, Any]:
        for deployment, found_id, stored in self._deployments():
            if found_id == model_id:
                return {"model_id": model_id, **self._info(deployment, found_id, stored)}
        record = self.directory.model(model_id) or {}
        return {"model_id": model_id, "model_name": record.get("model_name")}

    async def _update(self, request: Any, model_id: str | None, doc: dict) -> bytes:
        info = doc.get("model_info") or {}
        model_id = model_id or (info.get("id") if isinstance(info, dict) else None)
        record = self.found(model_id)
        entry = {
            "model_name": doc.get("model_name") or record["model_name"],
            "litellm_params": {**record["litellm_params"], **(doc.get("litellm_params") or {})},
            "model_info": {**(record.get("model_info") or {}), **(info if isinstance(info, dict) else {})},
        }
        entry = _entry_of(entry)
        others = [e for e in self.stored_entries() if e["model_info"]["id"] != record["model_id"]]
        self._check([*others, entry], entry)
        await self.directory.update("model", record["model_id"], entry)
        self.apply()
        self.operator("model_updated", model_id=record["model_id"])
        return json_answer(request, 200, self._answer(record["model_id"]))

    @record_answers
    async def update(self, request: Any, model_id: str | None = None) -> bytes:
        """C{POST /model/update} C{{"model_info": {"id"}, ...}} (or C{PATCH /model/{id}/update})."""
        self.master(request)
        return await self._update(request, model_id, read_body(request))

    @record_answers
    async def delete(self, request: Any) -> bytes:
        """C{POST /model/delete} C{{"id"}}: a stored model (the file's entries are the operator's)."""
        self.master(request)
        doc = read_body(request)
        model_id = doc.get("id")
        if not isinstance(model_id, str) or not model_id:
            raise KeyApiError(400, "'id' is required: the model's id (model_info.id)", "id")
        if self.directory.model(model_id) is None:
            if any(found == model_id for _d, found, _s in self._deployments()):
                raise KeyApiError(400, "this model is in the model table file: change it there", "id")
            raise KeyApiError(404, f"model not found: {model_id}", "id")
        await self.directory.delete("model", [model_id])
        self.apply()
        self.operator("model_deleted", model_id=model_id)
        return json_answer(request, 200, {"message": f"Model: {model_id} deleted successfully"})


def _litellm_model(deployment: Any) -> str:
    """The entry's C{litellm_params.model} as cllama_tx routes it."""
    return str(deployment.ref)
