from melbo.cli import main

main()
