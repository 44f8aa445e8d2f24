"""What a saved sbmoe model folder holds beyond sentence-transformers' own modules: the ``Router`` a query-only
head is saved in (so stock ``encode_query`` / ``encode_document`` route as sbmoe does) and the model card's sbmoe
section."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.base.modules.router import Router

from sbmoe.heads import SBMoEHead

DEFAULT_ROUTE = "document"  # a query-only model's route for encode() without a task, as in Router.for_query_document
CARD_START, CARD_END = "<!-- sbmoe -->", "<!-- /sbmoe -->"
CARD_TEMPLATE = """{start}
## Loading this sbmoe model

```bash
pip install sbmoe
```

```python
import sbmoe
model = sbmoe.load_model("PATH")
# or stock sentence-transformers (sbmoe must be installed: it provides the head's class)
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("PATH", trust_remote_code=True)
```

{about}

Training data: {data}.
{end}
"""


class TaskRouter(Router):
    """A sentence-transformers ``Router`` that passes the route it chose on as the task, so a module shared by the
    routes (a query-only head) knows it; the stock one passes ``task=None`` on the default route."""

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs: Any) -> dict[str, Any]:
        route = self._resolve_route(task or features.get("task"), kwargs.get("modality") or features.get("modality"))
        return super().forward(features, task=route, **kwargs)


def routed_module(module: torch.nn.Module) -> torch.nn.Module | None:
    """The one module every route of a ``Router`` runs (how a query-only head is saved), else None."""
    if not isinstance(module, Router):
        return None
    routes = [list(route) for route in module.sub_modules.values()]
    first = routes[0][0] if routes and len(routes[0]) == 1 else None
    return first if all(len(r) == 1 and r[0] is first for r in routes) else None


def with_sbmoe_section(card: str, head: SBMoEHead | None, training_data: str | None) -> str:
    """``card`` (a model card in markdown, maybe with YAML front matter) with its sbmoe section written anew: how to
    load the folder, what its head does, how it routes queries and documents, and what it was trained on."""
    if CARD_START in card:
        card = card[: card.index(CARD_START)] + card[card.index(CARD_END) + len(CARD_END) :].lstrip("\n")
    if head is None:
        about = "Head: none (the backbone with mean pooling)."
    else:
        about = (
            f"Head: {type(head).__name__} after mean pooling, {head.num_experts} experts of hidden size "
            f"{head.expert_hidden}; routing `{head.routing}` (top-{head.top_k} while training), inference "
            f"`{head.inference}`, residual {head.residual}, output normalised {head.normalize_output}."
        )
    if head is not None and head.query_only:
        about += (
            "\n\nRoutes (a sentence-transformers `Router`): queries go through the head, documents pass through it "
            "unchanged. Use `encode_query` for queries and `encode_document` for documents; `encode()` without a "
            f"task takes the `{DEFAULT_ROUTE}` route."
        )
    section = CARD_TEMPLATE.format(
        start=CARD_START,
        end=CARD_END,
        about=about,
        data=training_data or "not recorded here (see run.json, if present)",
    )
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4) + 5
        return card[:end] + "\n" + section + card[end:]
    return section + "\n" + card
