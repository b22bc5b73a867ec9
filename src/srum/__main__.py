from srum.cli import main

main()
