"""Follow-up of enrolled participants: consent for follow-up, a feed per trial under a trial
pseudonym (consumer, transactional relay, export), safety events through recruitment's outbox,
and endpoint counts per arm. See ``docs/how-to/follow-up-enrolled-participants.md``."""
