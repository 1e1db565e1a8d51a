"""`python -m testbed.cli ...` runs the command line, as the `testbed` console script does."""

from testbed.entry import main

main()
