from tsdkd.cli import main

main()
