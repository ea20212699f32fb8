"""
LiteLLM's team endpoints: C{/team/new} (an id made when none is given, a
budget optional), C{/team/info}, C{/team/update}, C{/team/delete} (the
team's keys with it), C{/team/list}, C{/team/member_add},
C{/team/member_delete}, C{/team/member_update}, C{/team/block},
C{/team/unblock}, C{/team/model/add}, C{/team/model/delete}.

A team's C{model_aliases} stay with the virtual key store (the router
reads them there); everything else is the team's record in the directory.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.litellm_fields import InvalidField
from cllama_tx.identity.teams import (
    member_entry,
    membership,
    team_info,
    validate_member,
    validate_team,
)
from cllama_tx.sites.admin_http import (
    KeyApiError,
    arg,
    int_arg,
    json_answer,
    read_body,
    required_text,
    string_list,
)
from cllama_tx.sites.directory_api import RecordApi, record_answers
from cllama_tx.store.shared import scope_name

__all__ = ["TeamsApi"]


def _members(value: Any, field: str = "member") -> list[tuple[str, str, str | None]]:
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > 1000:
        raise InvalidField(field, f"'{field}' must be a member object or a list of 1 to 1000 of them")
    return [validate_member(item, field) for item in items]


def _member_budget(doc: dict) -> dict[str, Any]:
    """The member's own limits a body gives (LiteLLM's names)."""
    out: dict[str, Any] = {}
    if "max_budget_in_team" in doc:
        out["max_budget"] = f.money("max_budget_in_team", doc["max_budget_in_team"])
    if "budget_duration" in doc:
        out["budget_duration"] = f.budget_duration("budget_duration", doc["budget_duration"])
    for name in ("tpm_limit", "rpm_limit"):
        if name in doc:
            out[name] = f.count(name, doc[name])
    if "allowed_models" in doc:
        out["models"] = list(f.models("allowed_models", doc["allowed_models"]))
    return out


class TeamsApi(RecordApi):
    kind = "team"

    async def info_of(self, team: Any) -> dict[str, Any]:
        aliases = self.keys.store.team_aliases(team.id)
        return team_info(team, aliases, await self.spend(team), self.reset_at(team))

    async def _memberships(self, team: Any) -> list[dict]:
        out = []
        for user_id in sorted(team.members):
            member = membership(team, user_id)
            if member is None:
                continue
            entry = member.membership()
            entry["spend"] = await self.budgets.spend(
                scope_name("member", team.id, user_id), member.budget_duration, member.budget_anchor
            )
            out.append(entry)
        return out

    @record_answers
    async def new(self, request: Any) -> bytes:
        """C{POST /team/new}: every field optional; the team's id is made when none is given."""
        self.master(request)
        doc = read_body(request, allow_empty=True)
        team_id = self.id_of(doc, "team_id")
        fields = validate_team(doc, update=False)
        members: dict[str, Any] = {}
        now = self.budgets.now()
        for user_id, role, email in _members(doc["members_with_roles"], "members_with_roles") \
                if doc.get("members_with_roles") else []:
            members[user_id] = member_entry(role, email, {}, now)
        aliases = f.model_aliases("model_aliases", doc.get("model_aliases"))
        fields["members"] = members
        team = await self.directory.create("team", team_id, fields)
        if aliases:
            await self.keys.store.set_team_aliases(team_id, aliases)
        await self.set_spend_from(team, doc)
        self.operator("team_created", team_id=team_id)
        return json_answer(request, 200, await self.info_of(team))

    @record_answers
    async def info(self, request: Any) -> bytes:
        """C{GET /team/info?team_id=}: the team, its keys and its members' budgets and spend."""
        self.master(request)
        team = self.found(arg(request, "team_id"))
        return json_answer(request, 200, {
            "team_id": team.id,
            "team_info": await self.info_of(team),
            "keys": await self.keys_of(team_id=team.id),
            "team_memberships": await self._memberships(team),
        })

    @record_answers
    async def update(self, request: Any) -> bytes:
        """C{POST /team/update}: the fields given; C{null} clears one; C{spend} sets the spend."""
        self.master(request)
        doc = read_body(request)
        team = self.found(doc.get("team_id"))
        fields = validate_team(doc, update=True)
        if fields:
            team = await self.directory.update("team", team.id, fields)
        if "model_aliases" in doc:
            await self.keys.store.set_team_aliases(team.id, doc["model_aliases"])
        if "max_budget" in fields or "budget_duration" in fields:
            await self.budgets.drop_override_budget(self.scope(team))
        await self.set_spend_from(team, doc)
        self.operator("team_updated", team_id=team.id, fields=sorted(doc))
        return json_answer(request, 200, {"team_id": team.id, "data": await self.info_of(team),
                                          **await self.info_of(team)})

    @record_answers
    async def delete(self, request: Any) -> bytes:
        """C{POST /team/delete} C{{"team_ids": [...]}}: the teams and their keys go at once."""
        self.master(request)
        doc = read_body(request)
        team_ids = string_list(doc, "team_ids")
        missing = [t for t in team_ids if self.directory.team(t) is None]
        if missing:
            raise KeyApiError(404, f"team not found: {', '.join(missing)}", "team_ids")
        keys = 0
        for team_id in team_ids:
            keys += await self.delete_keys_of(team_id=team_id)
            if self.keys.store.team_aliases(team_id):
                await self.keys.store.set_team_aliases(team_id, None)
        deleted = await self.directory.delete("team", team_ids)
        self.operator("teams_deleted", team_ids=deleted, keys=keys)
        return json_answer(request, 200, {"deleted_teams": deleted, "deleted_keys": keys})

    @record_answers
    async def list(self, request: Any) -> bytes:
        """C{GET /team/list?user_id=&organization_id=}: every team (LiteLLM's list of team objects)."""
        self.master(request)
        user_id = arg(request, "user_id")
        org_id = arg(request, "organization_id")
        teams = [
            t for t in self.directory.all("team")
            if (user_id is None or user_id in t.members) and (org_id is None or t.org == org_id)
        ]
        return json_answer(request, 200, [await self.info_of(t) for t in teams])

    @record_answers
    async def list_v2(self, request: Any) -> bytes:
        """C{GET /v2/team/list?page=&page_size=&user_id=&organization_id=&team_alias=}: one page of teams."""
        self.master(request)
        page = int_arg(request, "page", 1, 1, None)
        size = int_arg(request, "page_size", 10, 1, 100)
        user_id = arg(request, "user_id")
        org_id = arg(request, "organization_id")
        alias = arg(request, "team_alias")
        teams = [
            t for t in self.directory.all("team")
            if (user_id is None or user_id in t.members) and (org_id is None or t.org == org_id)
            and (alias is None or t.alias == alias)
        ]
        chosen = teams[(page - 1) * size: page * size]
        return json_answer(request, 200, {
            "teams": [await self.info_of(t) for t in chosen],
            "total": len(teams),
            "page": page,
            "page_size": size,
            "total_pages": -(-len(teams) // size),
        })

    @record_answers
    async def member_add(self, request: Any) -> bytes:
        """C{POST /team/member_add} C{{"team_id", "member": {...} or [...], "max_budget_in_team"}}."""
        self.master(request)
        doc = read_body(request)
        team = self.found(doc.get("team_id"))
        if "member" not in doc:
            raise KeyApiError(400, "'member' is required: {\"user_id\", \"role\"}", "member")
        added = _members(doc["member"])
        budget = _member_budget(doc)
        now = self.budgets.now()
        for user_id, _role, _email in added:
            if user_id in team.members:
                raise KeyApiError(400, f"user {user_id!r} is already a member of team {team.id!r}", "member")
        changes = {user_id: member_entry(role, email, budget, now) for user_id, role, email in added}
        team = await self.directory.update("team", team.id, {"members": changes})
        self.operator("team_members_added", team_id=team.id, user_ids=sorted(changes))
        info = await self.info_of(team)
        memberships = [m for m in await self._memberships(team) if m["user_id"] in changes]
        users = [{"user_id": u, "teams": self.directory.teams_of(u)} for u in sorted(changes)]
        return json_answer(request, 200, {**info, "updated_users": users, "updated_team_memberships": memberships})

    def _member_id(self, doc: dict) -> str:
        user_id = f.text("user_id", doc.get("user_id")) or f.text("user_email", doc.get("user_email"))
        if user_id is None:
            raise KeyApiError(400, "'user_id' (or 'user_email') is required", "user_id")
        return user_id

    @record_answers
    async def member_delete(self, request: Any) -> bytes:
        """C{POST /team/member_delete} C{{"team_id", "user_id"}}."""
        self.master(request)
        doc = read_body(request)
        team = self.found(doc.get("team_id"))
        user_id = self._member_id(doc)
        if user_id not in team.members:
            raise KeyApiError(404, f"user {user_id!r} is not a member of team {team.id!r}", "user_id")
        team = await self.directory.update("team", team.id, {"members": {user_id: None}})
        self.operator("team_member_deleted", team_id=team.id, user_id=user_id)
        return json_answer(request, 200, await self.info_of(team))

    @record_answers
    async def member_update(self, request: Any) -> bytes:
        """C{POST /team/member_update}: a member's role and budget within the team."""
        self.master(request)
        doc = read_body(request)
        team = self.found(doc.get("team_id"))
        user_id = self._member_id(doc)
        entry = team.members.get(user_id)
        if entry is None:
            raise KeyApiError(404, f"user {user_id!r} is not a member of team {team.id!r}", "user_id")
        role = doc.get("role") or entry.get("role", "user")
        if role not in ("admin", "user"):
            raise KeyApiError(400, "'role' must be admin or user", "role")
        updated = member_entry(role, None, _member_budget(doc), self.budgets.now(), entry)
        team = await self.directory.update("team", team.id, {"members": {user_id: updated}})
        member = membership(team, user_id)
        assert member is not None
        self.operator("team_member_updated", team_id=team.id, user_id=user_id)
        return json_answer(request, 200, {
            "team_id": team.id,
            "user_id": user_id,
            "user_email": member.user_email,
            "role": member.role,
            "max_budget_in_team": member.max_budget,
            "budget_duration": member.budget_duration,
            "tpm_limit": member.tpm_limit,
            "rpm_limit": member.rpm_limit,
            "allowed_models": list(member.models),
        })

    async def _set_blocked(self, request: Any, blocked: bool) -> bytes:
        self.master(request)
        doc = read_body(request)
        team = self.found(doc.get("team_id"))
        team = await self.directory.update("team", team.id, {"blocked": blocked})
        self.operator("team_blocked" if blocked else "team_unblocked", team_id=team.id)
        return json_answer(request, 200, await self.info_of(team))

    @record_answers
    async def block(self, request: Any) -> bytes:
        """C{POST /team/block} C{{"team_id"}}: every key of the team fails until unblocked."""
        return await self._set_blocked(request, True)

    @record_answers
    async def unblock(self, request: Any) -> bytes:
        """C{POST /team/unblock} C{{"team_id"}}."""
        return await self._set_blocked(request, False)

    async def _models(self, request: Any, add: bool) -> bytes:
        self.master(request)
        doc = read_body(request)
        team = self.found(required_text(doc, "team_id", "the team"))
        models = f.models("models", doc.get("models"))
        if not models:
            raise KeyApiError(400, "'models' must name at least one model", "models")
        current = list(team.models)
        if add:
            current.extend(m for m in models if m not in current)
        else:
            current = [m for m in current if m not in models]
        team = await self.directory.update("team", team.id, {"models": current})
        return json_answer(request, 200, await self.info_of(team))

    @record_answers
    async def model_add(self, request: Any) -> bytes:
        """C{POST /team/model/add} C{{"team_id", "models"}}."""
        return await self._models(request, True)

    @record_answers
    async def model_delete(self, request: Any) -> bytes:
        """C{POST /team/model/delete} C{{"team_id", "models"}}."""
        return await self._models(request, False)
