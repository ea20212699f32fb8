"""
LiteLLM's organisation endpoints: C{/organization/new},
C{/organization/update} (PATCH, as LiteLLM; POST too),
C{/organization/delete} (DELETE; POST too), C{/organization/info},
C{/organization/list}, C{/organization/member_add},
C{/organization/member_delete}, C{/organization/member_update}.

An organisation's budget covers every key of its teams and every key that
names it (C{organization_id} on the key); deleting one leaves its teams,
which no longer belong to it.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.litellm_fields import InvalidField
from cllama_tx.identity.organizations import ROLES, organization_info, validate_organization
from cllama_tx.sites.admin_http import KeyApiError, arg, json_answer, read_body, string_list
from cllama_tx.sites.directory_api import RecordApi, record_answers

__all__ = ["OrganizationsApi"]


def _org_members(value: Any) -> list[tuple[str, str, str | None]]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise InvalidField("member", "'member' must be an object with 'user_id' and 'role'")
        user_id = f.text("member", item.get("user_id")) or f.text("member", item.get("user_email"))
        if user_id is None:
            raise InvalidField("member", "'member' needs a 'user_id' (or 'user_email')")
        role = item.get("role", "internal_user")
        if role not in ROLES:
            raise InvalidField("member", f"'member.role' must be one of {', '.join(ROLES)}")
        out.append((user_id, role, f.text("member", item.get("user_email"))))
    return out


class OrganizationsApi(RecordApi):
    kind = "org"

    async def info_of(self, org: Any) -> dict[str, Any]:
        teams = [{"team_id": t.id, "team_alias": t.alias} for t in self.directory.teams_in(org.id)]
        return organization_info(org, teams, await self.spend(org), self.reset_at(org))

    @record_answers
    async def new(self, request: Any) -> bytes:
        """C{POST /organization/new}: an id is made when none is given."""
        self.master(request)
        doc = read_body(request, allow_empty=True)
        org_id = self.id_of(doc, "organization_id")
        fields = validate_organization(doc, update=False)
        now = self.budgets.now()
        if doc.get("members"):
            fields["members"] = {
                user_id: {"role": role, "user_email": email, "added_at": now}
                for user_id, role, email in _org_members(doc["members"])
            }
        org = await self.directory.create("org", org_id, fields)
        await self.set_spend_from(org, doc)
        self.operator("organization_created", organization_id=org_id)
        return json_answer(request, 200, await self.info_of(org))

    @record_answers
    async def info(self, request: Any) -> bytes:
        """C{GET /organization/info?organization_id=} (or POST C{{"organizations": [...]}}: a list)."""
        self.master(request)
        if request.method == b"POST":
            ids = string_list(read_body(request), "organizations")
            return json_answer(request, 200, [await self.info_of(self.found(i)) for i in ids])
        org = self.found(arg(request, "organization_id"))
        return json_answer(request, 200, await self.info_of(org))

    @record_answers
    async def update(self, request: Any) -> bytes:
        """C{PATCH /organization/update} C{{"organization_id", ...}}."""
        self.master(request)
        doc = read_body(request)
        org = self.found(doc.get("organization_id"))
        fields = validate_organization(doc, update=True)
        if fields:
            org = await self.directory.update("org", org.id, fields)
        await self.set_spend_from(org, doc)
        self.operator("organization_updated", organization_id=org.id, fields=sorted(doc))
        return json_answer(request, 200, await self.info_of(org))

    @record_answers
    async def delete(self, request: Any) -> bytes:
        """C{DELETE /organization/delete} C{{"organization_ids": [...]}}: their teams stay, without them."""
        self.master(request)
        ids = string_list(read_body(request), "organization_ids")
        missing = [i for i in ids if self.directory.organization(i) is None]
        if missing:
            raise KeyApiError(404, f"organization not found: {', '.join(missing)}", "organization_ids")
        infos = [await self.info_of(self.found(i)) for i in ids]
        for org_id in ids:
            for team in self.directory.teams_in(org_id):
                await self.directory.update("team", team.id, {"org": None})
        await self.directory.delete("org", ids)
        self.operator("organizations_deleted", organization_ids=ids)
        return json_answer(request, 200, infos)

    @record_answers
    async def list(self, request: Any) -> bytes:
        """C{GET /organization/list}: every organisation."""
        self.master(request)
        return json_answer(request, 200, [await self.info_of(o) for o in self.directory.all("org")])

    @record_answers
    async def member_add(self, request: Any) -> bytes:
        """C{POST /organization/member_add} C{{"organization_id", "member": {...} or [...]}}."""
        self.master(request)
        doc = read_body(request)
        org = self.found(doc.get("organization_id"))
        if "member" not in doc:
            raise KeyApiError(400, "'member' is required: {\"user_id\", \"role\"}", "member")
        now = self.budgets.now()
        added = {user_id: {"role": role, "user_email": email, "added_at": now}
                 for user_id, role, email in _org_members(doc["member"])}
        org = await self.directory.update("org", org.id, {"members": added})
        info = await self.info_of(org)
        return json_answer(request, 200, {
            "organization_id": org.id,
            "updated_users": [{"user_id": u} for u in sorted(added)],
            "updated_organization_memberships": [m for m in info["members"] if m["user_id"] in added],
        })

    def _member(self, doc: dict) -> tuple[Any, str]:
        org = self.found(doc.get("organization_id"))
        user_id = f.text("user_id", doc.get("user_id")) or f.text("user_email", doc.get("user_email"))
        if user_id is None:
            raise KeyApiError(400, "'user_id' (or 'user_email') is required", "user_id")
        if user_id not in org.members:
            raise KeyApiError(404, f"user {user_id!r} is not a member of organization {org.id!r}", "user_id")
        return org, user_id

    @record_answers
    async def member_delete(self, request: Any) -> bytes:
        """C{DELETE /organization/member_delete} C{{"organization_id", "user_id"}}."""
        self.master(request)
        org, user_id = self._member(read_body(request))
        org = await self.directory.update("org", org.id, {"members": {user_id: None}})
        return json_answer(request, 200, await self.info_of(org))

    @record_answers
    async def member_update(self, request: Any) -> bytes:
        """C{PATCH /organization/member_update} C{{"organization_id", "user_id", "role"}}."""
        self.master(request)
        doc = read_body(request)
        org, user_id = self._member(doc)
        role = doc.get("role", org.members[user_id].get("role"))
        if role not in ROLES:
            raise KeyApiError(400, f"'role' must be one of {', '.join(ROLES)}", "role")
        entry = {**org.members[user_id], "role": role}
        org = await self.directory.update("org", org.id, {"members": {user_id: entry}})
        member = [m for m in (await self.info_of(org))["members"] if m["user_id"] == user_id][0]
        return json_answer(request, 200, member)
