"""
LiteLLM's user endpoints: C{/user/new} (an id made when none is given; a
key minted for the user unless C{auto_create_key} is false; C{teams}
joined), C{/user/info}, C{/user/update}, C{/user/delete} (the user's keys
with it), C{/user/list}.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.litellm_fields import InvalidField
from cllama_tx.identity.teams import member_entry
from cllama_tx.identity.users import user_info, validate_user
from cllama_tx.sites.admin_http import (
    KeyApiError,
    arg,
    int_arg,
    json_answer,
    read_body,
    string_list,
)
from cllama_tx.sites.directory_api import RecordApi, record_answers

__all__ = ["UsersApi"]

MAX_PAGE_SIZE = 100


def _teams(value: Any) -> list[tuple[str, float | None, str]]:
    """C{teams} of C{/user/new}: team ids, or C{{"team_id", "max_budget_in_team", "user_role"}}."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidField("teams", "'teams' must be a list of team ids or team objects")
    out: list[tuple[str, float | None, str]] = []
    for item in value:
        if isinstance(item, str):
            out.append((item, None, "user"))
        elif isinstance(item, dict):
            team_id = f.text("teams", item.get("team_id"))
            if team_id is None:
                raise InvalidField("teams", "each team object needs a 'team_id'")
            role = item.get("user_role", "user")
            if role not in ("admin", "user"):
                raise InvalidField("teams", "'user_role' must be admin or user")
            out.append((team_id, f.money("teams", item.get("max_budget_in_team")), role))
        else:
            raise InvalidField("teams", "'teams' must be a list of team ids or team objects")
    return out


class UsersApi(RecordApi):
    kind = "user"

    async def info_of(self, user: Any) -> dict[str, Any]:
        return user_info(user, self.directory.teams_of(user.id), await self.spend(user), self.reset_at(user))

    @record_answers
    async def new(self, request: Any) -> bytes:
        """C{POST /user/new}: the user, and (unless C{auto_create_key} is false) a key of theirs."""
        self.master(request)
        doc = read_body(request, allow_empty=True)
        user_id = self.id_of(doc, "user_id")
        fields = validate_user(doc, update=False)
        joins = _teams(doc.get("teams"))
        if doc.get("team_id"):
            joins.append((f.text("team_id", doc["team_id"]) or "", None, "user"))
        for team_id, _budget, _role in joins:
            self.found(team_id, "team")
        create_key = doc.get("auto_create_key", True)
        if not isinstance(create_key, bool):
            raise KeyApiError(400, "'auto_create_key' must be true or false", "auto_create_key")
        user = await self.directory.create("user", user_id, fields)
        now = self.budgets.now()
        for team_id, budget, role in joins:
            entry = member_entry(role, f.text("user_email", doc.get("user_email")),
                                 {"max_budget": budget} if budget is not None else {}, now)
            await self.directory.update("team", team_id, {"members": {user_id: entry}})
        await self.set_spend_from(user, doc)
        answer = await self.info_of(user)
        answer["key"] = None
        if create_key:
            key_doc = {"user_id": user_id, "key_alias": doc.get("key_alias"), "duration": doc.get("duration")}
            if len(joins) == 1:
                key_doc["team_id"] = joins[0][0]
            key, vk, _spend = await self.keys.mint({k: v for k, v in key_doc.items() if v is not None}, None)
            answer.update(key=key, token_id=vk.token_hash, key_name=vk.key_name, key_alias=vk.key_alias,
                          expires=vk.to_info()["expires"])
        self.operator("user_created", user_id=user_id)
        return json_answer(request, 200, answer, no_store=True)

    @record_answers
    async def info(self, request: Any) -> bytes:
        """C{GET /user/info?user_id=}: the user, their keys and their teams."""
        self.master(request)
        user_id = arg(request, "user_id")
        user = self.found(user_id)
        teams = [self.directory.team(t) for t in self.directory.teams_of(user.id)]
        return json_answer(request, 200, {
            "user_id": user.id,
            "user_info": await self.info_of(user),
            "keys": await self.keys_of(user_id=user.id),
            "teams": [{"team_id": t.id, "team_alias": t.alias} for t in teams if t is not None],
        })

    @record_answers
    async def info_v2(self, request: Any) -> bytes:
        """C{GET /v2/user/info?user_id=}: the user object alone (LiteLLM's lightweight form)."""
        self.master(request)
        return json_answer(request, 200, await self.info_of(self.found(arg(request, "user_id"))))

    @record_answers
    async def update(self, request: Any) -> bytes:
        """C{POST /user/update} C{{"user_id", ...}}: the fields given; C{spend} sets the spend."""
        self.master(request)
        doc = read_body(request)
        user_id = doc.get("user_id") or doc.get("user_email")
        user = self.found(user_id)
        fields = validate_user(doc, update=True)
        if fields:
            user = await self.directory.update("user", user.id, fields)
        await self.set_spend_from(user, doc)
        self.operator("user_updated", user_id=user.id, fields=sorted(doc))
        return json_answer(request, 200, {"user_id": user.id, "data": await self.info_of(user),
                                          **await self.info_of(user)})

    @record_answers
    async def delete(self, request: Any) -> bytes:
        """C{POST /user/delete} C{{"user_ids": [...]}}: the users, their keys and memberships."""
        self.master(request)
        user_ids = string_list(read_body(request), "user_ids")
        missing = [u for u in user_ids if self.directory.user(u) is None]
        if missing:
            raise KeyApiError(404, f"user not found: {', '.join(missing)}", "user_ids")
        keys = 0
        for user_id in user_ids:
            keys += await self.delete_keys_of(user_id=user_id)
            for team_id in self.directory.teams_of(user_id):
                await self.directory.update("team", team_id, {"members": {user_id: None}})
        deleted = await self.directory.delete("user", user_ids)
        self.operator("users_deleted", user_ids=deleted, keys=keys)
        return json_answer(request, 200, {"deleted_users": deleted, "deleted_keys": keys})

    @record_answers
    async def list(self, request: Any) -> bytes:
        """C{GET /user/list?page=&page_size=&user_ids=&team=&role=}: one page of users."""
        self.master(request)
        page = int_arg(request, "page", 1, 1, None)
        size = int_arg(request, "page_size", 25, 1, MAX_PAGE_SIZE)
        wanted = arg(request, "user_ids")
        ids = set(wanted.split(",")) if wanted else None
        team = arg(request, "team")
        role = arg(request, "role")
        users = [
            u for u in self.directory.all("user")
            if (ids is None or u.id in ids)
            and (team is None or u.id in getattr(self.directory.team(team), "members", {}))
            and (role is None or u.extra.get("user_role", "internal_user") == role)
        ]
        total = len(users)
        chosen = users[(page - 1) * size: page * size]
        return json_answer(request, 200, {
            "users": [await self.info_of(u) for u in chosen],
            "total": total,
            "page": page,
            "page_size": size,
            "total_pages": -(-total // size),
        })
