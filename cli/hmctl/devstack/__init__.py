"""The local stack behind ``hmctl dev`` (DESIGN §14): process supervision (:mod:`.processes`), state and
its lock (:mod:`.state`), the stack itself (:mod:`.stack`), what it needs from the machine
(:mod:`.environment`), foreground log streaming (:mod:`.follow`), the moto process
(:mod:`.moto_server`) and the demo story (:mod:`.demo`).

Imports core (``hivemind``) only: the control plane and the runner run as separate processes.
"""
