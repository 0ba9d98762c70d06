"""The bundled demo service (``loopwatch demo``). It plays the part of a user's program, so its
files count as the program's own code in findings, unlike the rest of the package."""
