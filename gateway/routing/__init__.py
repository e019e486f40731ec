"""Routing: operator-edited YAML rules mapping every Message to Kafka records.

See docs/rules.md for the language.  Public API: ``load_rules``, ``Router``,
``RouteResult``, ``RuleTable``, ``RulesReloader``, ``RulesError``.
"""

from gateway.routing.compile import CompiledRule, DeadLetter, RuleTable
from gateway.routing.load import load_rules
from gateway.routing.reload import RulesReloader
from gateway.routing.router import Router, RouteResult, route
from gateway.routing.rules import RuleError, RulesError

__all__ = [
    "CompiledRule",
    "DeadLetter",
    "RouteResult",
    "Router",
    "RuleError",
    "RuleTable",
    "RulesError",
    "RulesReloader",
    "load_rules",
    "route",
]
