"""Federated feasibility: one node per data controller, a hub that holds no patient data.

A **node** is the product at one data controller (its own topic prefix, pseudonym key, identity
vault and disclosure policy). It answers the hub's questions under its own disclosure control
(:mod:`.node`) and signs what it sends (:mod:`.tokens`). The **hub** (:mod:`.hub`) registers
nodes, fans a sponsor's question out with a deadline and combines the nodes' *protected* answers
(:mod:`.combine`), never their exact counts. The scheme and its threat model:
``docs/explanation/federation.md``.
"""
