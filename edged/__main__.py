from edged.cli import main

main()
