"""`python -m testbed.cli ...` runs the command line."""

from testbed.cli.app import main

main()
