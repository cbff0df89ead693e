"""UDP binding lifetime (RFC 5780 §4.6), sans-IO.

For each idle time T in :data:`STEPS` (up to the user's bound), a fresh socket
``life-T`` sends one binding request and then stays silent. T seconds after its
answer, a separate socket ``life-probe`` asks the server, with RESPONSE-PORT, to
send an answer to ``life-T``'s mapped port. If the binding still exists the
answer arrives on ``life-T``; if not, the NAT drops it. Only inbound packets
touch ``life-T``'s binding, and each binding is checked once, so the measurement
does not keep alive what it measures.

All steps run in parallel (the whole run lasts about the largest T tested); as
soon as one binding is found dead, the longer ones are cancelled.
"""

from __future__ import annotations

from p2pim.stun.codec import Addr

from .classify import keepalive_for
from .discovery import Timings, binding_probe
from .probes import Outcome, Probe, ProbePlanner, ProbeSet
from .report import LifetimeResult

#: Idle times tested (s). Dense at the short end, where NAT timeouts matter most
#: for keepalive cost; 30 s and 120 s are the common UDP defaults.
STEPS = (2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
DEFAULT_MAX = 120.0


def steps_up_to(max_idle: float) -> list[float]:
    steps = [s for s in STEPS if s <= max_idle]
    if not steps or steps[-1] < max_idle:
        steps.append(max_idle)
    return steps


class LifetimeMeasurement(ProbePlanner):
    """See the module docstring; ``wait`` is how long to wait for each check's answer."""

    def __init__(
        self,
        server: Addr,
        now: float,
        max_idle: float = DEFAULT_MAX,
        wait: float = 0.5,
        timings: Timings = Timings(),
    ) -> None:
        self.server = server
        self.steps = steps_up_to(max_idle)
        self.sockets = ["life-probe"] + [self._sock(s) for s in self.steps]
        self.wait = wait
        self.timings = timings
        self.probes = ProbeSet()
        self._binds: dict[float, Probe] = {}
        self._checks: dict[float, Probe] = {}
        self.notes: list[str] = []
        for step in self.steps:
            self._binds[step] = self.probes.add(
                binding_probe(
                    f"bind-{step:g}", self._sock(step), server, now, timings.first_rto, timings.give_up, 7
                )
            )
        self._finished = False

    @staticmethod
    def _sock(step: float) -> str:
        return f"life-{step:g}"

    @property
    def done(self) -> bool:
        return self._finished

    def _advance(self, now: float) -> None:
        t = self.timings
        for step, bind in self._binds.items():
            if step in self._checks or not bind.done:
                continue
            if bind.outcome is Outcome.ANSWERED and bind.mapped and bind.tx.answered_at is not None:
                start = bind.tx.answered_at + step
                check = binding_probe(
                    f"check-{step:g}",
                    "life-probe",
                    self.server,
                    start,
                    self.wait / 2 ** (t.negative_sends - 1),
                    self.wait,
                    t.negative_sends,
                    response_port=bind.mapped[1],
                    receive_on=self._sock(step),
                )
                self._checks[step] = self.probes.add(check)
            elif bind.outcome is not Outcome.ANSWERED:
                self._cancel(f"no answer to the binding for the {step:g} s test")
        for step, check in sorted(self._checks.items()):
            if check.outcome is Outcome.TIMED_OUT:
                # Dead at this idle time: longer ones tell us nothing more.
                for longer in self.steps:
                    if longer > step:
                        self._drop(longer)
            elif check.outcome is Outcome.ERROR:
                self._cancel(f"the server refused RESPONSE-PORT (error {check.error_code})")
        if self.probes.all_done:
            self._finished = True

    def _drop(self, step: float) -> None:
        for probe in (self._binds.get(step), self._checks.get(step)):
            if probe is not None and not probe.done:
                probe.outcome = Outcome.CANCELLED

    def _cancel(self, why: str) -> None:
        if why not in self.notes:
            self.notes.append(why)
        for step in self.steps:
            self._drop(step)

    def result(self) -> LifetimeResult:
        alive = [s for s, c in self._checks.items() if c.outcome is Outcome.ANSWERED]
        dead = [s for s, c in self._checks.items() if c.outcome is Outcome.TIMED_OUT]
        alive_for = max(alive) if alive else None
        dead_after = min(dead) if dead else None
        if alive_for is not None and dead_after is not None and alive_for > dead_after:
            # Non-monotonic (loss, or a NAT with per-binding randomness): trust the death.
            alive_for = max((s for s in alive if s < dead_after), default=None)
        return LifetimeResult(
            alive_for=alive_for,
            dead_after=dead_after,
            keepalive=keepalive_for(alive_for, dead_after),
            tested_up_to=self.steps[-1],
        )
